-- A migration like the services' own: a table with a named constraint.
CREATE TABLE probe (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    label TEXT NOT NULL CONSTRAINT probe_label_unique UNIQUE
);

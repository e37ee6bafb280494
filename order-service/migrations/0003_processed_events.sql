-- The payment results already applied, by eventId: a redelivered result finds its id
-- here and changes nothing.
CREATE TABLE processed_events (
    event_id     UUID        PRIMARY KEY,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Analytics and the status filter read orders by status and time.
CREATE INDEX orders_by_status ON orders (status, updated_at);

-- order-service owns the `orders` schema (the connection's search_path).

-- An order and its lines. Money is integer minor units; the total is stored, checked
-- against the lines when written, and never recomputed differently later.
CREATE TABLE orders (
    id               UUID PRIMARY KEY,
    user_id          TEXT        NOT NULL,
    status           TEXT        NOT NULL DEFAULT 'PENDING'
                     CONSTRAINT orders_status_known CHECK (status IN ('PENDING', 'CONFIRMED', 'REJECTED')),
    items            JSONB       NOT NULL,
    total            BIGINT      NOT NULL CONSTRAINT orders_total_positive CHECK (total > 0),
    currency         CHAR(3)     NOT NULL,
    rejection_reason TEXT,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Keyset pagination, newest first: a caller's orders, and all orders for admins.
CREATE INDEX orders_by_user_newest ON orders (user_id, created_at DESC, id DESC);
CREATE INDEX orders_newest ON orders (created_at DESC, id DESC);

-- Idempotency-Key: one row per user and key, with a fingerprint of the request and,
-- once the first request committed, the answer every retry gets.
CREATE TABLE idempotency_keys (
    user_id       TEXT        NOT NULL,
    key           TEXT        NOT NULL,
    fingerprint   TEXT        NOT NULL,
    status_code   SMALLINT,
    response      JSONB,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);

-- The transactional outbox: written in the same transaction as the change it
-- announces; a relay publishes pending rows in id order and marks them published
-- only after the broker acknowledged.
CREATE TABLE outbox (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     UUID        NOT NULL CONSTRAINT outbox_event_unique UNIQUE,
    topic        TEXT        NOT NULL,
    key          TEXT        NOT NULL,
    event_type   TEXT        NOT NULL,
    payload      JSONB       NOT NULL,
    headers      JSONB       NOT NULL DEFAULT '{}'::jsonb,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at TIMESTAMPTZ
);

-- The relay's work queue: only pending rows, in order.
CREATE INDEX outbox_pending ON outbox (id) WHERE published_at IS NULL;

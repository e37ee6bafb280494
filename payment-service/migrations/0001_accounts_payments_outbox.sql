-- payment-service owns the `payments` schema (the connection's search_path).

-- One account per user, in one currency, set by the first deposit. Money is integer
-- minor units. The CHECK is the last line of defence: no bug can overdraw an account.
CREATE TABLE accounts (
    user_id    TEXT        PRIMARY KEY,
    balance    BIGINT      NOT NULL CONSTRAINT accounts_never_overdrawn CHECK (balance >= 0),
    currency   CHAR(3)     NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Every deposit, for the audit trail; an Idempotency-Key makes a retried deposit
-- count once.
CREATE TABLE deposits (
    id              UUID        PRIMARY KEY,
    user_id         TEXT        NOT NULL REFERENCES accounts (user_id),
    amount          BIGINT      NOT NULL CONSTRAINT deposits_amount_positive CHECK (amount > 0),
    currency        CHAR(3)     NOT NULL,
    made_by         TEXT        NOT NULL,
    idempotency_key TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT deposits_key_once UNIQUE (made_by, idempotency_key)
);

-- At most one payment per order: the unique order_id is what makes a second
-- order-created for the same order (a new eventId, a replay) unable to debit twice.
CREATE TABLE payments (
    id         UUID        PRIMARY KEY,
    order_id   UUID        NOT NULL CONSTRAINT payments_one_per_order UNIQUE,
    user_id    TEXT        NOT NULL,
    amount     BIGINT      NOT NULL CONSTRAINT payments_amount_positive CHECK (amount > 0),
    currency   CHAR(3)     NOT NULL,
    status     TEXT        NOT NULL CONSTRAINT payments_status_known CHECK (status IN ('VALIDATED', 'DECLINED')),
    reason     TEXT,
    event_id   UUID        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX payments_by_user_newest ON payments (user_id, created_at DESC, id DESC);

-- The eventIds already applied: a redelivered event finds its id here and changes
-- nothing.
CREATE TABLE processed_events (
    event_id     UUID        PRIMARY KEY,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The transactional outbox, as in order-service: written with the payment, relayed
-- to Kafka after the commit.
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

CREATE INDEX outbox_pending ON outbox (id) WHERE published_at IS NULL;

-- Wake the relay the moment a result is written (once per statement).
CREATE FUNCTION notify_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('payments_outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION notify_outbox();

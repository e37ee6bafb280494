-- notification-service owns the `notifications` schema (the connection's search_path).

-- One notification per order outcome. The consumer writes it PENDING in the same
-- transaction that claims the event; the mailer sends it later, so an SMTP outage
-- delays mail but never holds up the partition, and a notification is never lost.
CREATE TABLE notifications (
    id              UUID        PRIMARY KEY,
    order_id        UUID        NOT NULL,
    user_id         TEXT        NOT NULL,
    -- The outcome announced: payment-validated or payment-declined.
    kind            TEXT        NOT NULL,
    channel         TEXT        NOT NULL DEFAULT 'email',
    recipient       TEXT        NOT NULL,
    subject         TEXT        NOT NULL,
    body            TEXT        NOT NULL,
    status          TEXT        NOT NULL DEFAULT 'PENDING'
                    CONSTRAINT notifications_status_known CHECK (status IN ('PENDING', 'SENT', 'FAILED')),
    attempts        INTEGER     NOT NULL DEFAULT 0,
    last_error      TEXT,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    event_id        UUID        NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    sent_at         TIMESTAMPTZ,
    CONSTRAINT notifications_one_per_outcome UNIQUE (order_id, kind)
);

-- The mailer's queue: pending rows by due time.
CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE status = 'PENDING';
-- GET /notifications: a user's, newest first.
CREATE INDEX notifications_by_user_newest ON notifications (user_id, created_at DESC, id DESC);

-- The eventIds already applied.
CREATE TABLE processed_events (
    event_id     UUID        PRIMARY KEY,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Wake the mailer the moment a notification is queued.
CREATE FUNCTION notify_mailer() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('notifications_pending', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER notifications_notify AFTER INSERT ON notifications
    FOR EACH STATEMENT EXECUTE FUNCTION notify_mailer();

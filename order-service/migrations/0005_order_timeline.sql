-- What `GET /orders/{id}/timeline` reads, recorded as each hop happens: the trace the
-- order was placed in, its `order-created` event (whose outbox row says when it was
-- published), when payment-service decided, and when that decision reached Kafka.
ALTER TABLE orders
    ADD COLUMN trace_id            TEXT,
    ADD COLUMN created_event_id    UUID,
    ADD COLUMN payment_decided_at  TIMESTAMPTZ,
    ADD COLUMN result_published_at TIMESTAMPTZ;

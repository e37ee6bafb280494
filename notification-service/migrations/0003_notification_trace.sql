-- The trace context of the consumer span that queued a notification, so the mail
-- sent for it later joins the trace of the order that caused it.
ALTER TABLE notifications ADD COLUMN traceparent TEXT;

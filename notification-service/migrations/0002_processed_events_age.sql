-- The consumer forgets applied eventIds older than its retention every hour.
CREATE INDEX processed_events_by_age ON processed_events (processed_at);

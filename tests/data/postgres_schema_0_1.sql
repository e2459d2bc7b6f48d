-- The DDL of rtbroadcast 0.1's PostgreSQL backend (schema_sql() before headers), verbatim but for the
-- schema's name, "__SCHEMA__": tests/test_postgres.py upgrades from it and runs its statements.
CREATE SCHEMA IF NOT EXISTS "__SCHEMA__";

-- One row per channel: its epoch and the seq of its last event. A publish locks it until its
-- transaction ends: that lock is what makes seq order commit order.
CREATE TABLE IF NOT EXISTS "__SCHEMA__".channels (
    channel    text PRIMARY KEY,
    epoch      text NOT NULL,
    seq        bigint NOT NULL DEFAULT 0,
    touched_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- The events of each channel's epoch, for the listeners and for resume; trimmed in the background.
CREATE TABLE IF NOT EXISTS "__SCHEMA__".events (
    channel    text NOT NULL,
    epoch      text NOT NULL,
    seq        bigint NOT NULL,
    data       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (channel, epoch, seq)
);
CREATE INDEX IF NOT EXISTS events_created_at ON "__SCHEMA__".events (created_at);

-- Idempotency keys seen recently, with the envelope of the publish they named.
CREATE TABLE IF NOT EXISTS "__SCHEMA__".idempotency_keys (
    channel    text NOT NULL,
    key        text NOT NULL,
    epoch      text NOT NULL,
    seq        bigint NOT NULL,
    data       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (channel, key)
);
CREATE INDEX IF NOT EXISTS idempotency_keys_created_at ON "__SCHEMA__".idempotency_keys (created_at);

-- Publish one event: lock the channel's row (creating it with the candidate epoch), answer a recent
-- idempotency key with its first publish, else take the next seq, store the event and notify its
-- position. Runs in the caller's transaction when there is one.
CREATE OR REPLACE FUNCTION "__SCHEMA__".publish(
    p_channel text, p_epoch text, p_head text, p_notify text, p_key text, p_key_ttl double precision
) RETURNS TABLE (epoch text, seq bigint, data text, duplicate boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_epoch text;
    v_seq bigint;
    v_data text;
BEGIN
    SELECT c.epoch, c.seq INTO v_epoch, v_seq FROM "__SCHEMA__".channels c WHERE c.channel = p_channel FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO "__SCHEMA__".channels AS c (channel, epoch, seq) VALUES (p_channel, p_epoch, 0)
            ON CONFLICT (channel) DO NOTHING;
        SELECT c.epoch, c.seq INTO v_epoch, v_seq FROM "__SCHEMA__".channels c WHERE c.channel = p_channel FOR UPDATE;
    END IF;
    IF p_key IS NOT NULL THEN
        SELECT k.seq, k.data INTO v_seq, v_data FROM "__SCHEMA__".idempotency_keys k
            WHERE k.channel = p_channel AND k.key = p_key AND k.epoch = v_epoch
            AND k.created_at > clock_timestamp() - make_interval(secs => p_key_ttl);
        IF FOUND THEN
            RETURN QUERY SELECT v_epoch, v_seq, v_data, true;
            RETURN;
        END IF;
        SELECT c.seq INTO v_seq FROM "__SCHEMA__".channels c WHERE c.channel = p_channel;
    END IF;
    v_seq := v_seq + 1;
    v_data := p_head || v_seq || '}';
    UPDATE "__SCHEMA__".channels c SET seq = v_seq, touched_at = clock_timestamp() WHERE c.channel = p_channel;
    INSERT INTO "__SCHEMA__".events (channel, epoch, seq, data) VALUES (p_channel, v_epoch, v_seq, v_data);
    IF p_key IS NOT NULL THEN
        INSERT INTO "__SCHEMA__".idempotency_keys AS k (channel, key, epoch, seq, data)
            VALUES (p_channel, p_key, v_epoch, v_seq, v_data)
            ON CONFLICT (channel, key) DO UPDATE SET epoch = excluded.epoch, seq = excluded.seq,
                data = excluded.data, created_at = excluded.created_at;
    END IF;
    PERFORM pg_notify(p_notify, v_seq || ' ' || v_epoch || ' ' || p_channel);
    RETURN QUERY SELECT v_epoch, v_seq, v_data, false;
END
$$;

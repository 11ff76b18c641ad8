"""Schema migrations, in order; each service owns its own schema.

Never edit an applied migration: append a new one. They are applied in list order and
recorded by name; the number in a name is a label (work merged from parallel branches took
numbers out of sequence), so order never follows from it.
"""

from __future__ import annotations

MIGRATIONS: list[tuple[str, str]] = [
    (
        "0001_schemas",
        """
        CREATE SCHEMA IF NOT EXISTS device;
        CREATE SCHEMA IF NOT EXISTS data;
        CREATE SCHEMA IF NOT EXISTS analytics;
        CREATE SCHEMA IF NOT EXISTS notification;
        """,
    ),
    (
        "0002_claim_checks",
        """
        -- large request bodies are stored here and workflows carry the id (claim check)
        CREATE TABLE fleetflow.claim_checks (
            claim_id   text PRIMARY KEY,
            tenant     text NOT NULL,
            kind       text NOT NULL,
            body       jsonb NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
    (
        "0003_device_registry",
        """
        CREATE TABLE device.device_types (
            name              text PRIMARY KEY,
            config_schema     jsonb NOT NULL,
            default_config    jsonb NOT NULL DEFAULT '{}',
            requires_approval boolean NOT NULL DEFAULT false
        );
        CREATE TABLE device.devices (
            tenant           text NOT NULL,
            device_id        text NOT NULL,
            device_type      text NOT NULL REFERENCES device.device_types(name),
            firmware_version text NOT NULL,
            tags             text[] NOT NULL DEFAULT '{}',
            metadata         jsonb NOT NULL DEFAULT '{}',
            status           text NOT NULL CHECK (status IN
                ('pending', 'provisioned', 'active', 'decommissioned', 'failed')),
            onboarding_id    text NOT NULL,
            status_reason    text,
            created_at       timestamptz NOT NULL DEFAULT now(),
            updated_at       timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant, device_id)
        );
        CREATE INDEX devices_status ON device.devices (tenant, status);
        CREATE INDEX devices_tags ON device.devices USING gin (tags);
        CREATE TABLE device.status_changes (
            id          bigserial PRIMARY KEY,
            tenant      text NOT NULL,
            device_id   text NOT NULL,
            from_status text,
            to_status   text NOT NULL,
            reason      text,
            actor       text NOT NULL,
            changed_at  timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX status_changes_device ON device.status_changes (tenant, device_id, id);
        CREATE TABLE device.credentials (
            jti         text PRIMARY KEY,
            tenant      text NOT NULL,
            device_id   text NOT NULL,
            token_hash  text NOT NULL,
            issued_at   timestamptz NOT NULL,
            expires_at  timestamptz NOT NULL,
            revoked_at  timestamptz,
            FOREIGN KEY (tenant, device_id) REFERENCES device.devices(tenant, device_id)
        );
        CREATE INDEX credentials_device ON device.credentials (tenant, device_id);
        CREATE TABLE device.configurations (
            tenant     text NOT NULL,
            device_id  text NOT NULL,
            config     jsonb NOT NULL,
            version    integer NOT NULL DEFAULT 1,
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant, device_id),
            FOREIGN KEY (tenant, device_id) REFERENCES device.devices(tenant, device_id)
        );
        INSERT INTO device.device_types (name, config_schema, default_config, requires_approval)
        VALUES
          ('thermostat',
           '{"type": "object", "additionalProperties": false,
             "properties": {
               "target_c": {"type": "number", "minimum": 5, "maximum": 35},
               "mode": {"type": "string", "enum": ["heat", "cool", "auto", "off"]},
               "report_interval_s": {"type": "integer", "minimum": 1, "maximum": 86400}}}',
           '{"target_c": 21, "mode": "auto", "report_interval_s": 60}', false),
          ('sensor',
           '{"type": "object", "additionalProperties": false,
             "properties": {
               "report_interval_s": {"type": "integer", "minimum": 1, "maximum": 86400},
               "metrics": {"type": "array", "items": {"type": "string", "maxLength": 64},
                           "maxItems": 32}}}',
           '{"report_interval_s": 10, "metrics": ["temperature"]}', false),
          ('gateway',
           '{"type": "object", "additionalProperties": false,
             "required": ["site"],
             "properties": {
               "site": {"type": "string", "minLength": 1, "maxLength": 64},
               "uplink": {"type": "string", "enum": ["ethernet", "lte", "wifi"]}}}',
           '{"site": "unassigned", "uplink": "ethernet"}', true);
        """,
    ),
    (
        "0004_notification_events",
        """
        CREATE TABLE notification.events (
            seq             bigserial PRIMARY KEY,
            event_id        text NOT NULL UNIQUE,
            tenant          text NOT NULL,
            device_id       text,
            type            text NOT NULL,
            occurred_at     timestamptz NOT NULL,
            actor           text NOT NULL,
            source_workflow text,
            data            jsonb NOT NULL DEFAULT '{}'
        );
        CREATE INDEX events_device ON notification.events (tenant, device_id, seq);
        CREATE INDEX events_type ON notification.events (tenant, type, seq);
        """,
    ),
    (
        "0005_telemetry",
        """
        -- acknowledged batches: durable before the API answers 202, processed in windows
        CREATE TABLE data.ingest_batches (
            tenant      text NOT NULL,
            batch_id    text NOT NULL,
            bucket      integer NOT NULL,          -- 0..1023; shard = bucket % shards
            readings    integer NOT NULL,
            device_ids  text[] NOT NULL,
            payload     bytea,                     -- CSV rows, dropped once stored
            received_at timestamptz NOT NULL DEFAULT now(),
            status      text NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'claimed', 'stored')),
            window_id   text,
            stored_at   timestamptz,
            PRIMARY KEY (tenant, batch_id)
        );
        CREATE INDEX ingest_batches_pending ON data.ingest_batches (received_at)
            WHERE status = 'pending';
        CREATE INDEX ingest_batches_window ON data.ingest_batches (window_id);
        CREATE TABLE data.readings (
            tenant    text NOT NULL,
            device_id text NOT NULL,
            metric    text NOT NULL,
            ts        timestamptz NOT NULL,
            value     double precision NOT NULL
        ) PARTITION BY RANGE (ts);
        CREATE INDEX readings_series ON data.readings (tenant, device_id, metric, ts);
        CREATE TABLE data.quarantined_readings (
            tenant    text NOT NULL,
            device_id text NOT NULL,
            metric    text NOT NULL,
            ts        timestamptz NOT NULL,
            value     double precision NOT NULL,
            reason    text NOT NULL,
            batch_id  text NOT NULL,
            window_id text NOT NULL
        );
        CREATE INDEX quarantined_device ON data.quarantined_readings (tenant, device_id);
        CREATE TABLE data.windows (
            window_id   text PRIMARY KEY,
            stored      bigint NOT NULL,
            quarantined bigint NOT NULL,
            by_tenant   jsonb NOT NULL,
            stored_at   timestamptz NOT NULL DEFAULT now()
        );
        -- per-series aggregates of a window: the analytics service reads these, not the rows
        CREATE TABLE data.window_stats (
            window_id   text NOT NULL,
            tenant      text NOT NULL,
            device_id   text NOT NULL,
            metric      text NOT NULL,
            n           bigint NOT NULL,
            mean        double precision NOT NULL,
            var         double precision NOT NULL,
            min_value   double precision NOT NULL,
            max_value   double precision NOT NULL,
            first_ts    timestamptz NOT NULL,
            first_value double precision NOT NULL,
            last_ts     timestamptz NOT NULL,
            last_value  double precision NOT NULL,
            PRIMARY KEY (window_id, tenant, device_id, metric)
        );
        CREATE TABLE analytics.rules (
            tenant      text NOT NULL,
            rule_id     text NOT NULL,
            device_type text NOT NULL,
            metric      text NOT NULL,
            kind        text NOT NULL CHECK (kind IN ('threshold', 'rate', 'zscore')),
            params      jsonb NOT NULL,
            enabled     boolean NOT NULL DEFAULT true,
            PRIMARY KEY (tenant, rule_id)
        );
        CREATE TABLE analytics.series (
            tenant     text NOT NULL,
            device_id  text NOT NULL,
            metric     text NOT NULL,
            n          bigint NOT NULL,
            mean       double precision NOT NULL,
            var        double precision NOT NULL,
            last_ts    timestamptz NOT NULL,
            last_value double precision NOT NULL,
            PRIMARY KEY (tenant, device_id, metric)
        );
        CREATE TABLE analytics.alerts (
            alert_id     bigserial PRIMARY KEY,
            tenant       text NOT NULL,
            device_id    text NOT NULL,
            rule_id      text NOT NULL,
            metric       text NOT NULL,
            status       text NOT NULL CHECK (status IN ('open', 'cleared')),
            raised_at    timestamptz NOT NULL,
            raised_value double precision NOT NULL,
            detail       text NOT NULL,
            cleared_at   timestamptz,
            cleared_value double precision
        );
        -- one open alert per device and rule: a flapping sensor cannot raise a storm
        CREATE UNIQUE INDEX alerts_one_open ON analytics.alerts (tenant, device_id, rule_id)
            WHERE status = 'open';
        CREATE INDEX alerts_status ON analytics.alerts (tenant, status, alert_id);
        CREATE TABLE analytics.windows (
            window_id text PRIMARY KEY,
            events    jsonb NOT NULL
        );
        """,
    ),
    (
        "0006_event_bus",
        """
        -- webhook subscribers; the secret signs each delivery (HMAC), so it is kept
        CREATE TABLE notification.subscriptions (
            subscription_id text PRIMARY KEY,
            tenant          text NOT NULL,
            url             text NOT NULL,
            event_types     text[] NOT NULL,
            secret          text NOT NULL,
            max_attempts    integer NOT NULL,
            backoff_s       double precision NOT NULL,
            max_backoff_s   double precision NOT NULL,
            created_by      text NOT NULL,
            created_at      timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX subscriptions_tenant ON notification.subscriptions (tenant);
        -- one row per (subscription, event), enqueued in the transaction that records the event;
        -- a dead letter is a delivery with status 'dead'
        CREATE TABLE notification.deliveries (
            delivery_id     bigserial PRIMARY KEY,
            subscription_id text NOT NULL
                            REFERENCES notification.subscriptions ON DELETE CASCADE,
            event_seq       bigint NOT NULL REFERENCES notification.events (seq) ON DELETE CASCADE,
            status          text NOT NULL DEFAULT 'pending'
                            CHECK (status IN ('pending', 'delivered', 'dead')),
            attempts        integer NOT NULL DEFAULT 0,
            last_error      text,
            created_at      timestamptz NOT NULL DEFAULT now(),
            updated_at      timestamptz NOT NULL DEFAULT now(),
            UNIQUE (subscription_id, event_seq)
        );
        CREATE INDEX deliveries_pending ON notification.deliveries (subscription_id, event_seq)
            WHERE status = 'pending';
        CREATE INDEX deliveries_dead ON notification.deliveries (subscription_id, delivery_id)
            WHERE status = 'dead';
        CREATE INDEX deliveries_event ON notification.deliveries (event_seq);
        """,
    ),
    (
        "0007_ingest_payload_uncompressed",
        """
        -- batch payloads are written once and read once: compressing them costs more CPU
        -- on the ingest path than the disk it saves
        ALTER TABLE data.ingest_batches ALTER COLUMN payload SET STORAGE EXTERNAL;
        """,
    ),
    (
        "0008_firmware_rollouts",
        """
        CREATE TABLE device.firmware (
            tenant      text NOT NULL,
            firmware_id text NOT NULL,
            device_type text NOT NULL REFERENCES device.device_types(name),
            version     text NOT NULL,
            sha256      text NOT NULL,
            size        bigint NOT NULL,
            path        text NOT NULL,
            uploaded_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant, firmware_id),
            UNIQUE (tenant, device_type, version)
        );
        CREATE TABLE device.rollouts (
            tenant      text NOT NULL,
            campaign_id text NOT NULL,
            firmware_id text NOT NULL,
            request     jsonb NOT NULL,
            waves       integer[] NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant, campaign_id),
            FOREIGN KEY (tenant, firmware_id) REFERENCES device.firmware(tenant, firmware_id)
        );
        -- per-device job state lives here, not in workflow history: a 10,000-device
        -- campaign is a few hundred events, not 10,000 child workflows
        CREATE TABLE device.rollout_jobs (
            tenant           text NOT NULL,
            campaign_id      text NOT NULL,
            device_id        text NOT NULL,
            kind             text NOT NULL CHECK (kind IN ('update', 'rollback')),
            wave             integer NOT NULL,
            state            text NOT NULL CHECK (state IN ('queued', 'offered', 'downloading',
                                 'installing', 'succeeded', 'failed', 'timed_out', 'cancelled')),
            attempts         integer NOT NULL DEFAULT 0,
            target_version   text NOT NULL,
            previous_version text NOT NULL,
            offered_at       timestamptz,
            updated_at       timestamptz NOT NULL DEFAULT now(),
            finished_seq     bigint,
            detail           text,
            PRIMARY KEY (tenant, campaign_id, device_id, kind),
            FOREIGN KEY (tenant, device_id) REFERENCES device.devices(tenant, device_id)
        );
        CREATE SEQUENCE device.rollout_finished_seq;
        CREATE INDEX rollout_jobs_state ON device.rollout_jobs (tenant, campaign_id, kind, state, wave);
        CREATE INDEX rollout_jobs_device ON device.rollout_jobs (tenant, device_id, state);
        CREATE INDEX rollout_jobs_finished ON device.rollout_jobs (tenant, campaign_id, kind, finished_seq);
        CREATE TABLE data.archived_readings (LIKE data.readings);
        CREATE INDEX archived_device ON data.archived_readings (tenant, device_id, metric, ts);
        """,
    ),
    (
        "0009_credential_kid",
        """
        -- the signing key of each credential, so re-issuing it after a rotation gives the same
        -- token (ES256 signatures are deterministic per key)
        ALTER TABLE device.credentials ADD COLUMN kid text;
        """,
    ),
    (
        "0010_credential_revocation_notify",
        """
        -- API processes cache credential checks for seconds; every revocation (or removal)
        -- tells them at once, whichever service or script made it
        CREATE FUNCTION device.credential_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('device_credentials_revoked', OLD.jti);
            RETURN NULL;
        END $$;
        CREATE TRIGGER credential_changed AFTER UPDATE OR DELETE ON device.credentials
            FOR EACH ROW EXECUTE FUNCTION device.credential_changed();
        """,
    ),
    (
        "0011_tenant_device_types",
        """
        -- device types become per tenant: '' holds the built-in ones every tenant sees, a
        -- tenant's own type of the same name hides the built-in one for that tenant only (a
        -- tenant admin used to change the types of every tenant)
        ALTER TABLE device.devices DROP CONSTRAINT devices_device_type_fkey;
        ALTER TABLE device.firmware DROP CONSTRAINT firmware_device_type_fkey;
        ALTER TABLE device.device_types ADD COLUMN tenant text NOT NULL DEFAULT '';
        ALTER TABLE device.device_types DROP CONSTRAINT device_types_pkey;
        ALTER TABLE device.device_types ADD PRIMARY KEY (tenant, name);
        """,
    ),
    (
        "0070_api_token_revocations",
        """
        -- revoked API tokens by tenant and jti (`fleetflow token revoke`); expires_at (when
        -- known) lets rows of expired tokens go; every API process hears of a revocation at once
        CREATE TABLE fleetflow.revoked_tokens (
            tenant     text NOT NULL,
            jti        text NOT NULL,
            expires_at timestamptz,
            reason     text,
            revoked_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant, jti)
        );
        CREATE FUNCTION fleetflow.token_revoked() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('api_tokens_revoked', NEW.tenant || '/' || NEW.jti);
            RETURN NULL;
        END $$;
        CREATE TRIGGER token_revoked AFTER INSERT OR UPDATE ON fleetflow.revoked_tokens
            FOR EACH ROW EXECUTE FUNCTION fleetflow.token_revoked();
        """,
    ),
    (
        "0080_ingest_batch_writer",
        """
        -- a batch id is the sender's own: the key names who wrote the batch ('device:<id>' for a
        -- device credential, 'token:<subject>' for an API token), so one device's ids never block
        -- another's; digest (sha256 of the batch's rows) tells a retry (same content: duplicate)
        -- from a reuse of the id for other content (409). Rows from before: writer '', no digest.
        ALTER TABLE data.ingest_batches ADD COLUMN writer text NOT NULL DEFAULT '';
        ALTER TABLE data.ingest_batches ADD COLUMN digest bytea;
        ALTER TABLE data.ingest_batches DROP CONSTRAINT ingest_batches_pkey;
        ALTER TABLE data.ingest_batches ADD PRIMARY KEY (tenant, writer, batch_id);
        """,
    ),
    (
        "0081_tenant_profiles",
        """
        -- a tenant's overrides of the platform's default limits (fleetflow.contracts.tenants)
        CREATE TABLE fleetflow.tenant_profiles (
            tenant     text PRIMARY KEY,
            profile    jsonb NOT NULL DEFAULT '{}',
            updated_at timestamptz NOT NULL DEFAULT now(),
            updated_by text NOT NULL
        );
        """,
    ),
    (
        "0060_events_keyed_by_tenant",
        """
        -- an event id is unique within its tenant only: two tenants' events with the same id
        -- (same device and rule ids in one window) are both kept; `digest` tells a retry of
        -- the same event from a different event that reuses an id, which is kept too
        ALTER TABLE notification.events ADD COLUMN digest text;
        ALTER TABLE notification.events DROP CONSTRAINT events_event_id_key;
        ALTER TABLE notification.events ADD CONSTRAINT events_tenant_event_id_key
            UNIQUE (tenant, event_id);
        -- a rotated webhook secret signs deliveries beside the new one until it expires
        ALTER TABLE notification.subscriptions ADD COLUMN previous_secret text,
            ADD COLUMN previous_secret_expires_at timestamptz;
        -- dead letters keep the status a receiver answered, never what it said: older rows
        -- held up to 200 characters of the answer (an internal service's, via a forged URL)
        UPDATE notification.deliveries SET last_error = substring(last_error from '^HTTP [0-9]+')
            WHERE last_error ~ '^HTTP [0-9]+: ';
        """,
    ),
    (
        "0050_rollout_tick_key",
        """
        -- a rollout tick's retry must not offer a second batch: the campaign keeps the key of
        -- its last tick (workflow run id / activity id) and what that tick decided
        ALTER TABLE device.rollouts ADD COLUMN last_tick_key text,
            ADD COLUMN last_tick_offered integer NOT NULL DEFAULT 0,
            ADD COLUMN last_tick_abort_at timestamptz;
        """,
    ),
    (
        "0020_ingest_windows_in_tables",
        """
        -- what grows with a window (unready devices, alert events) stays in tables keyed by
        -- window id; the ingestion workflow carries the window id and counts
        CREATE TABLE device.window_unready (
            window_id text NOT NULL,
            tenant    text NOT NULL,
            device_id text NOT NULL,
            reason    text NOT NULL,
            PRIMARY KEY (window_id, tenant, device_id)
        );
        CREATE TABLE analytics.window_events (
            window_id text NOT NULL,
            tenant    text NOT NULL,
            event_id  text NOT NULL,
            event     jsonb NOT NULL,
            PRIMARY KEY (window_id, tenant, event_id)
        );
        -- a batch whose window step fails the same way on every retry (a poison pill) is set
        -- aside with the error as its reason, payload kept, so its shard goes on
        ALTER TABLE data.ingest_batches DROP CONSTRAINT ingest_batches_status_check;
        ALTER TABLE data.ingest_batches ADD CONSTRAINT ingest_batches_status_check
            CHECK (status IN ('pending', 'claimed', 'stored', 'quarantined'));
        ALTER TABLE data.ingest_batches ADD COLUMN reason text;
        ALTER TABLE data.ingest_batches ADD COLUMN quarantined_at timestamptz;
        CREATE INDEX ingest_batches_quarantined ON data.ingest_batches (tenant, quarantined_at)
            WHERE status = 'quarantined';
        -- the supervisor finds claims of runs that are gone
        CREATE INDEX ingest_batches_claimed ON data.ingest_batches (window_id) WHERE status = 'claimed';
        """,
    ),
    (
        "0021_windows_stored_at",
        """
        -- the ingestion supervisor looks at the last hour's windows every few seconds
        CREATE INDEX windows_stored_at ON data.windows (stored_at);
        """,
    ),
    (
        "0120_dead_letters_without_protocol_quotes",
        """
        -- a webhook answer that was not valid HTTP was quoted by the parser's error, and dead
        -- letters kept the quote: they keep the parser's reason only
        UPDATE notification.deliveries
            SET last_error = substring(last_error from '^[A-Za-z]*ProtocolError: [^:]*')
            WHERE last_error ~ '^[A-Za-z]*ProtocolError: [^:]*:';
        """,
    ),
    (
        "0140_subscription_circuits",
        """
        -- a circuit breaker per webhook subscription: after circuit_threshold consecutive
        -- failures of its receiver (no answer, 5xx, 408, 429) deliveries pause, events stay
        -- pending in order, and one probe is posted at next_probe_at (a growing back-off)
        ALTER TABLE notification.subscriptions
            ADD COLUMN circuit_threshold integer NOT NULL DEFAULT 5,
            ADD COLUMN circuit_probe_s double precision NOT NULL DEFAULT 30,
            ADD COLUMN circuit_max_probe_s double precision NOT NULL DEFAULT 3600,
            ADD CONSTRAINT subscriptions_tenant_subscription_key UNIQUE (tenant, subscription_id);
        CREATE TABLE notification.circuits (
            tenant               text NOT NULL,
            subscription_id      text NOT NULL,
            state                text NOT NULL DEFAULT 'closed'
                                 CHECK (state IN ('closed', 'open', 'half_open')),
            consecutive_failures integer NOT NULL DEFAULT 0,
            failed_probes        integer NOT NULL DEFAULT 0,
            openings             integer NOT NULL DEFAULT 0,
            opened_at            timestamptz,
            next_probe_at        timestamptz,
            last_error           text,
            updated_at           timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant, subscription_id),
            FOREIGN KEY (tenant, subscription_id)
                REFERENCES notification.subscriptions (tenant, subscription_id) ON DELETE CASCADE
        );
        """,
    ),
    (
        "0230_alarm_lifecycle",
        """
        -- alarm lifecycle: a severity per rule (copied onto its alerts), acknowledge and clear
        -- by hand; an acknowledged alert is still active, so it stays the one alert of its
        -- device and rule (the rule neither raises a second one nor loses the clear)
        ALTER TABLE analytics.rules ADD COLUMN severity text NOT NULL DEFAULT 'major'
            CHECK (severity IN ('critical', 'major', 'minor', 'warning', 'info'));
        ALTER TABLE analytics.alerts
            ADD COLUMN severity text NOT NULL DEFAULT 'major'
                CHECK (severity IN ('critical', 'major', 'minor', 'warning', 'info')),
            ADD COLUMN acknowledged_at timestamptz,
            ADD COLUMN acknowledged_by text,
            ADD COLUMN ack_comment text,
            ADD COLUMN cleared_by text,
            ADD COLUMN clear_comment text,
            ADD COLUMN action_ids text[] NOT NULL DEFAULT '{}',
            DROP CONSTRAINT alerts_status_check,
            ADD CONSTRAINT alerts_status_check CHECK (status IN ('open', 'acknowledged', 'cleared'));
        DROP INDEX analytics.alerts_one_open;
        CREATE UNIQUE INDEX alerts_one_active ON analytics.alerts (tenant, device_id, rule_id)
            WHERE status <> 'cleared';
        CREATE INDEX alerts_tenant_severity ON analytics.alerts (tenant, severity, alert_id);
        CREATE INDEX alerts_tenant_device ON analytics.alerts (tenant, device_id, alert_id);
        """,
    ),
    (
        "0230_credential_renewal",
        """
        -- credential renewal and rotation: a superseded credential stays valid until
        -- valid_until (the overlap), which the credential check honours, so the end of the
        -- overlap needs no process to be alive; lifetime and overlap per device type
        ALTER TABLE device.device_types
            ADD COLUMN credential_lifetime_days integer CHECK (credential_lifetime_days > 0),
            ADD COLUMN credential_overlap_s integer CHECK (credential_overlap_s >= 0);
        ALTER TABLE device.credentials
            ADD COLUMN valid_until timestamptz,
            ADD COLUMN replaced_by text;
        -- one row per device of a rotation (or renewal): what happened to it, and its new jti
        CREATE TABLE device.credential_rotations (
            tenant      text NOT NULL,
            rotation_id text NOT NULL,
            device_id   text NOT NULL,
            outcome     text NOT NULL CHECK (outcome IN ('rotated', 'skipped')),
            reason      text,
            jti         text,
            at          timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant, rotation_id, device_id)
        );
        """,
    ),
    (
        "0210_device_commands",
        """
        -- device commands (durable RPC): one row per command of a device, moved by its
        -- DeviceCommand workflow (expiry, timeout), the device's poll (delivered) and its answer
        CREATE TABLE device.commands (
            tenant       text NOT NULL,
            device_id    text NOT NULL,
            command_id   text NOT NULL,
            name         text NOT NULL,
            params       jsonb NOT NULL DEFAULT '{}',
            status       text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered',
                         'succeeded', 'failed', 'expired', 'timed_out', 'cancelled')),
            result       jsonb,
            timeout_s    integer NOT NULL,
            created_at   timestamptz NOT NULL DEFAULT now(),
            expires_at   timestamptz NOT NULL,
            delivered_at timestamptz,
            finished_at  timestamptz,
            campaign_id  text,
            workflow_id  text,
            actor        text NOT NULL DEFAULT '',
            PRIMARY KEY (tenant, device_id, command_id)
        );
        CREATE INDEX commands_open ON device.commands (tenant, device_id, created_at)
            WHERE status IN ('pending', 'delivered');
        CREATE INDEX commands_listing ON device.commands (tenant, device_id, created_at DESC, command_id);
        -- the one long-poll a device may hold, across API processes: a lease
        CREATE TABLE device.command_pollers (
            tenant    text NOT NULL,
            device_id text NOT NULL,
            waiter_id text NOT NULL,
            until     timestamptz NOT NULL,
            PRIMARY KEY (tenant, device_id)
        );
        -- a new command NOTIFYs device_command_offered (a long-poll, an MQTT gateway pushes it);
        -- one that ends NOTIFYs device_command_settled (a caller waiting for the result)
        CREATE FUNCTION device.notify_command() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'INSERT' AND NEW.status = 'pending' THEN
                PERFORM pg_notify('device_command_offered', json_build_object(
                    'tenant', NEW.tenant, 'device_id', NEW.device_id, 'command_id', NEW.command_id)::text);
            ELSIF TG_OP = 'UPDATE' AND NEW.status IS DISTINCT FROM OLD.status
                  AND NEW.status NOT IN ('pending', 'delivered') THEN
                PERFORM pg_notify('device_command_settled', json_build_object(
                    'tenant', NEW.tenant, 'device_id', NEW.device_id, 'command_id', NEW.command_id)::text);
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER commands_notify AFTER INSERT OR UPDATE OF status ON device.commands
            FOR EACH ROW EXECUTE FUNCTION device.notify_command();
        -- a command campaign runs on the rollout machinery: no firmware, the command instead;
        -- each offer of its job is a command row (campaign_id set) the device polls and answers
        ALTER TABLE device.rollouts ALTER COLUMN firmware_id DROP NOT NULL;
        ALTER TABLE device.rollouts ADD COLUMN command jsonb;
        CREATE INDEX commands_campaign ON device.commands (tenant, campaign_id) WHERE campaign_id IS NOT NULL;
        """,
    ),
    (
        "0220_rollups",
        """
        -- 1-minute and 1-hour rollups per series, maintained by store_window in its transaction
        -- (activities/rollups.py) and kept longer than raw readings; the bucket index serves
        -- retention's deletes
        CREATE TABLE data.rollups_1m (
            tenant    text NOT NULL,
            device_id text NOT NULL,
            metric    text NOT NULL,
            bucket    timestamptz NOT NULL,
            n         bigint NOT NULL,
            total     double precision NOT NULL,
            min_value double precision NOT NULL,
            max_value double precision NOT NULL,
            PRIMARY KEY (tenant, device_id, metric, bucket)
        );
        CREATE INDEX rollups_1m_bucket ON data.rollups_1m (bucket);
        CREATE TABLE data.rollups_1h (LIKE data.rollups_1m INCLUDING ALL);
        CREATE INDEX rollups_1h_bucket ON data.rollups_1h (bucket);
        -- readings stored before: their rollups, once
        INSERT INTO data.rollups_1m
            SELECT tenant, device_id, metric,
                   date_bin('1 minute', ts, timestamptz '2000-01-01 00:00:00+00'),
                   count(*), sum(value), min(value), max(value)
            FROM data.readings GROUP BY 1, 2, 3, 4;
        INSERT INTO data.rollups_1h
            SELECT tenant, device_id, metric,
                   date_bin('1 hour', ts, timestamptz '2000-01-01 00:00:00+00'),
                   count(*), sum(value), min(value), max(value)
            FROM data.readings GROUP BY 1, 2, 3, 4;
        """,
    ),
    (
        "0250_consistency_findings",
        """
        -- Reconciliation's findings: one row per run, type, tenant and device (a retried page
        -- records nothing twice); only the newest finished run is kept
        CREATE TABLE device.consistency_findings (
            run_id    text NOT NULL,
            type      text NOT NULL,
            tenant    text NOT NULL,
            device_id text NOT NULL,
            detail    text NOT NULL,
            repaired  boolean NOT NULL,
            found_at  timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (run_id, type, tenant, device_id)
        );
        CREATE INDEX consistency_findings_tenant ON device.consistency_findings (run_id, tenant, type);
        CREATE TABLE device.consistency_runs (
            run_id      text PRIMARY KEY,
            started_at  timestamptz NOT NULL,
            finished_at timestamptz NOT NULL,
            checked     bigint NOT NULL,
            reclaimed   bigint NOT NULL
        );
        """,
    ),
    (
        "0251_dashboard_reader",
        """
        -- Grafana's data source: a read-only role, no login until `fleetflow migrate` sets a
        -- password from FLEETFLOW_DASHBOARD_DB_PASSWORD (no default credentials); it reads the
        -- tables the Fleet dashboard charts and nothing else (no credentials, no payloads)
        -- (a database user without CREATEROLE skips it with a warning: the platform still runs)
        DO $$ BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleetflow_dashboard') THEN
                CREATE ROLE fleetflow_dashboard NOLOGIN;
            END IF;
            GRANT USAGE ON SCHEMA device, data, analytics TO fleetflow_dashboard;
            GRANT SELECT ON device.devices, device.rollouts, device.rollout_jobs, data.readings,
                analytics.alerts TO fleetflow_dashboard;
        EXCEPTION WHEN insufficient_privilege THEN
            RAISE WARNING 'fleetflow_dashboard not created (%): the Fleet dashboard cannot log in', SQLERRM;
        END $$;
        """,
    ),
    (
        "0252_dashboard_reads_rollups",
        """
        -- the Fleet dashboard charts readings from the rollups (a year of hourly points answers
        -- as fast as an hour of raw ones) and alerts by severity
        DO $$ BEGIN
            GRANT SELECT ON data.rollups_1m, data.rollups_1h TO fleetflow_dashboard;
        EXCEPTION WHEN undefined_object THEN
            RAISE WARNING 'fleetflow_dashboard does not exist: the Fleet dashboard cannot log in';
        END $$;
        """,
    ),
    (
        "0160_mqtt_gateway",
        """
        -- the MQTT gateway: the last stored publish of each (device, packet id), so a QoS 1
        -- publish redelivered (DUP) after a lost PUBACK is recognised and stored once
        CREATE TABLE data.mqtt_packets (
            tenant    text NOT NULL,
            device_id text NOT NULL,
            packet_id integer NOT NULL,
            digest    bytea NOT NULL,
            batch_id  text NOT NULL,
            PRIMARY KEY (tenant, device_id, packet_id)
        );
        -- whether a device holds an MQTT connection, and since when; session_id names the
        -- connection, so an old connection's hang-up cannot mark a newer one offline
        CREATE TABLE device.mqtt_presence (
            tenant     text NOT NULL,
            device_id  text NOT NULL,
            online     boolean NOT NULL,
            changed_at timestamptz NOT NULL,
            session_id text NOT NULL,
            node       text NOT NULL,
            PRIMARY KEY (tenant, device_id)
        );
        CREATE INDEX mqtt_presence_node ON device.mqtt_presence (node) WHERE online;
        -- a job offered to a device: MQTT gateways push it on the device's jobs/notify topic
        CREATE FUNCTION device.job_offered() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('device_job_offered', NEW.tenant || '/' || NEW.device_id);
            RETURN NULL;
        END $$;
        CREATE TRIGGER job_offered AFTER INSERT OR UPDATE OF state ON device.rollout_jobs
            FOR EACH ROW WHEN (NEW.state = 'offered') EXECUTE FUNCTION device.job_offered();
        """,
    ),
    (
        "0360_firmware_blobs",
        """
        -- firmware image bytes shared by every API host (activities/device_firmware_blobs.py):
        -- one blob per upload, registered from its first byte so a killed upload is found and
        -- removed; with the PostgreSQL store its bytes are 1 MiB rows of firmware_chunks
        CREATE TABLE device.firmware_blobs (
            tenant     text NOT NULL,
            blob_id    text NOT NULL,
            store      text NOT NULL,
            state      text NOT NULL DEFAULT 'uploading'
                           CHECK (state IN ('uploading', 'complete', 'deleting')),
            size       bigint NOT NULL DEFAULT 0,
            sha256     text,
            upload_ref text,
            touched_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant, blob_id)
        );
        CREATE INDEX firmware_blobs_uploading ON device.firmware_blobs (touched_at)
            WHERE state = 'uploading';
        CREATE TABLE device.firmware_chunks (
            tenant  text NOT NULL,
            blob_id text NOT NULL,
            seq     integer NOT NULL,
            data    bytea NOT NULL,
            PRIMARY KEY (tenant, blob_id, seq),
            FOREIGN KEY (tenant, blob_id) REFERENCES device.firmware_blobs ON DELETE CASCADE
        );
        -- images are compressed already; uncompressed out-of-line storage makes substring() of
        -- a range read fetch only the bytes it needs
        ALTER TABLE device.firmware_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
        -- path: where an earlier version kept the file (imported into the store at API start)
        ALTER TABLE device.firmware ADD COLUMN blob_id text;
        ALTER TABLE device.firmware ALTER COLUMN path DROP NOT NULL;
        """,
    ),
    (
        "0350_tenant_profile_notify",
        """
        -- every API and MQTT process caches tenant limits: a changed profile NOTIFYs them all
        -- (payload: the tenant), whoever wrote it
        CREATE FUNCTION fleetflow.tenant_profile_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('tenant_profile_changed', coalesce(NEW.tenant, OLD.tenant));
            RETURN NULL;
        END $$;
        CREATE TRIGGER tenant_profile_changed AFTER INSERT OR UPDATE OR DELETE ON fleetflow.tenant_profiles
            FOR EACH ROW EXECUTE FUNCTION fleetflow.tenant_profile_changed();
        """,
    ),
    (
        "0340_command_pushes",
        """
        -- the MQTT process (node) that pushed a command at QoS 1 and awaits the device's PUBACK:
        -- when that process is killed, its next start gives the command back (pending again)
        ALTER TABLE device.commands ADD COLUMN pushed_by text;
        CREATE INDEX commands_pushed_by ON device.commands (pushed_by) WHERE pushed_by IS NOT NULL;
        """,
    ),
    (
        "0470_rules_watched",
        """
        -- a filling window asks whether a rule looks at the (tenant, metric) of its readings:
        -- one probe a pair, however many rules the tenants have
        CREATE INDEX rules_watched ON analytics.rules (tenant, metric) WHERE enabled;
        """,
    ),
    (
        "0480_alerts_rule_raised",
        """
        -- a window's raise looks for an alert of the device and rule raised in the window's span
        -- (one the early path raised and a hand cleared): by index, not by reading every alert
        -- the device ever had (no alert is purged; a flapping device has thousands)
        CREATE INDEX alerts_rule_raised ON analytics.alerts (tenant, device_id, rule_id, raised_at);
        """,
    ),
    (
        "0490_rules_window_watched",
        """
        -- a filling window stops early only for a rule that only a window can raise (rate,
        -- zscore): one probe a pair still, past a tenant's threshold rules on the same metric
        CREATE INDEX rules_window_watched ON analytics.rules (tenant, metric)
            WHERE enabled AND kind <> 'threshold';
        DROP INDEX analytics.rules_watched;
        """,
    ),
]

"""Schema migrations, in order; each service owns its own schema.

Never edit an applied migration: append a new one.
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
        SELECT 1;  -- telemetry ingestion (filled in by the ingestion work)
        """,
    ),
    (
        "0006_event_bus",
        """
        SELECT 1;  -- webhook subscriptions, deliveries and dead letters (event bus work)
        """,
    ),
]

"""The payload key of recorded histories: a published test key, so anyone can replay them."""

REPLAY_PAYLOAD_KEYS = "replay-1:cmVwbGF5LWhpc3Rvcmllcy1vbmx5LW5vdC1zZWNyZXQ="

"""What the jobs share: storage, URIs, inputs, tables, checkpoints, telemetry, the Ray runtime, exit codes."""

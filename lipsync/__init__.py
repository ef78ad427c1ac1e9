"""The `lipsync` command line and the end-to-end demo; imported by nothing but its own entry points."""

"""Hook implementations of the speech plugin."""

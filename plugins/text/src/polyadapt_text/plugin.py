"""Hook implementations of the text plugin."""

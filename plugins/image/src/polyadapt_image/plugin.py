"""Hook implementations of the image plugin."""

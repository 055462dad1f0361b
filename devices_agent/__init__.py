"""The board-side agent: a standalone package that never imports the server."""

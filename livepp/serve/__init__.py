"""`livepp serve`: the websocket service, its jobs and outboxes, and the live page."""

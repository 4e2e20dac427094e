"""The server's routers, one per concern; each route is thin: authenticate, resolve the model, build the job spec,
submit it to the engine, shape the answer."""

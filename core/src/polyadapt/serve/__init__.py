"""``polyadapt serve``: one loaded copy of each base, many adapters, every modality, behind OpenAI-shaped endpoints.

The layers, from the outside in (vLLM's split between its API server and its engine):

- :mod:`.app` and :mod:`.routers`: thin FastAPI routes, one router per concern, request models in OpenAI's shapes
  (:mod:`.schemas`), authentication as a dependency (:mod:`.auth`), every error turned into OpenAI's error JSON by one
  exception handler (:mod:`.errors`);
- :mod:`.engine`: the typed core: what a ``model`` name means for a tenant (adapter, route or base), the adapters'
  versions (followed live in the registry), one worker per base;
- :mod:`.scheduler` and :mod:`.cache`: the batching scheduler and the adapter LRU cache, plain classes tested without
  HTTP;
- the modality backends (:class:`.backend.ServingBackend`), contributed by the plugins through
  ``register_serving_backends``: they run the batches, rows of one batch using different adapters.

Importing this package is cheap; FastAPI, uvicorn and the models load when a server starts.
"""

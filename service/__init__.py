"""The FastAPI service: ``create_app(settings)`` in :mod:`service.app`, ``captioner-serve`` in :mod:`service.cli`."""

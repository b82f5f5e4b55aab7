"""paramserver.server: the parameter server (FastAPI over uvicorn), the ``app/`` folder.

:func:`paramserver.server.main.create_app` builds the ASGI app from a
:class:`~paramserver.server.settings.Settings`; ``paramserver serve`` runs it. The optimizer
math lives in :mod:`paramserver.server.optim` (numpy in, numpy out), the protocol's messages in
the shared :mod:`paramserver.messages`.
"""

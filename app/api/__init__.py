"""The HTTP layer: thin routes that read bodies and hand them to
:mod:`paramserver.server.service`."""

"""What the tests (and the benchmarks) use to reach the code under test; no test lives here.

* :mod:`.servers`: a free loopback port, the app under uvicorn in a thread of the test process,
  and a server as a child process (``python -m paramserver serve`` or any ``python`` command).
* :mod:`.service`: the service in process, without HTTP, plain or durable on a directory.
* :mod:`.http_api`: the sessions API spoken over HTTP with the reference ``msgpack`` package,
  and the checks of its answers (error bodies, what a refused request must not change).
* :mod:`.refusals`: a session to aim refused requests at, and the proof that nothing changed.
* :mod:`.models`: the models and gradients the tests train, and the engine's trajectories.
* :mod:`.faults`: injected faults: transports that drop or refuse, a request held open.
* :mod:`.hostile_bodies`: msgpack bodies built to exhaust a decoder.
* :mod:`.body_mutations`: hypothesis strategies of valid bodies and their mutations.

The benchmarks import :mod:`.servers` only (``from tests.harness.servers import ...``, from
the repository's root).
"""

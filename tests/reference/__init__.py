"""Reference implementations the tests compare against (see each module's docstring)."""

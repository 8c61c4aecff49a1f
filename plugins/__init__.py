"""First-party orch plugins, registered through entry points in pyproject.toml like any third party's."""

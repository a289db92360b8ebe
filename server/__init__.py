"""The Tinker REST front door: FastAPI app, wire codec, SQLite-backed sessions and futures.

`build_app(engine, settings)` (server.app) is the only entry point the CLI needs.
"""

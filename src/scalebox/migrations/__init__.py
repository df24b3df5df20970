"""Migrations: the ordered, idempotent steps a release runs on a server's config.

A release ships its migrations (``steps.py``, registered in order with
``registry.migration``); the updater runs the pending ones with the *new*
release's own interpreter, between its backup and its restart::

    /opt/scalebox/releases/<new>/venv/bin/python -m scalebox.migrations run \\
        --config /etc/scaleboxd/config --from 1.0.0 --to 1.1.0 --state FILE --json

A migration may change only /etc/scaleboxd/config, and only through
``configfile.ConfigFile`` (add a key with its default and a comment). See
CONTRIBUTING.md, "Writing a migration".
"""

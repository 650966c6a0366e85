"""The local runtime: processes, health probes, supervision, deployment and artifacts.

Nothing here knows about git or bundles; ``keystone.sync`` joins sources and runtime.
"""

"""The status page at ``/ui``: login sessions and the static files the API listener serves.

Nothing here is imported when the agent starts: the API handler imports these modules on the
first ``/ui`` request, and the page's files are read from disk on each request (never kept in
memory), so an agent nobody looks at pays nothing for the page.
"""

"""The run config's schema and its checks: every default of a run lives here.

May import: workers.
"""

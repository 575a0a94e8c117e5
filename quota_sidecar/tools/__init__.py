"""The command line, the load-test tool and the audit command."""

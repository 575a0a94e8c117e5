"""Redis: the only code that talks to it (the store, its transport and connections, the Lua scripts)."""

"""The Lua scripts, one file per atomic operation, shipped inside the wheel as ``app.lua``."""

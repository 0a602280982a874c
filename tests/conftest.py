pytest_plugins = ["qkdagent.testing.pytest_plugin", "pytester"]

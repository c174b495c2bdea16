def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads a real model (tens of seconds cold); deselect with -m 'not slow'")

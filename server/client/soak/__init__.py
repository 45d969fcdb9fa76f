"""`streamllm bench soak`: a long, faulty, multi-client run against real servers and a real Redis
(command.py), with the turn accounting of clients.py and the invariants of checks.py."""

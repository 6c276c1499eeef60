"""The μOmni networks. Parameter names equal the trainers' state-dict keys (MUOMNI_FORMAT.md §2)."""

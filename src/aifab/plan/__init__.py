"""The factory planner: what a facility of a given power buys, burns and produces. plan/ reads the hardware
catalog and the ledger (through meter/) and writes nothing."""

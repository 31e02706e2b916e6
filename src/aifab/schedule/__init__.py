"""Pure scheduling: the cluster's state, the policies that decide what runs where, a discrete-event simulator
and job traces. No I/O: the simulator and the control plane (aifab.jobs) drive the same objects."""

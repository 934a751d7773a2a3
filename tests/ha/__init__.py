"""`make ha`: BPS on a Patroni/etcd/HAProxy cluster, under the reliability workload, while the primary dies.

topology.py brings the cluster up and down, runner.py runs the load and the faults and checks the result with
tests/reliability's checks, timeline.py is the pure part (measured, unit-tested), load.py adapts the
workload's clients to record when each answer came. templates/ holds the configs, a starting point for
production.
"""

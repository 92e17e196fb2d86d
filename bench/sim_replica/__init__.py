"""Simulated replicas behind the real replica HTTP API (issue 8, part 4).

    python -m bench.sim_replica --port 9100 --replicas 8 --capacity-blocks 24000 \
        --latency-model h100-llama3-8b --time-scale 4

Each replica is the routing simulator's replica (bench/simulator/replica.py: the engine's
cache, KV events and scheduling rules, step times from the calibrated LatencyModel) stepped
in real time (bench/sim_replica/engine.py) and served over HTTP (server.py, openai_routes.py),
so the real gateway, or any router that speaks OpenAI, can be measured in front of N GPUs'
worth of replicas on one small CPU machine. Several replicas share one process and event loop
(one aiohttp server per port): cheaper on a 2-core machine than a process each.
"""

from swarm.monitor.cli import monitor_main

monitor_main()

from swarm.api.cli import api_main

api_main()

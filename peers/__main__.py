from peers.cli import peer_main

peer_main()

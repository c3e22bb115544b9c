from livepp.cli.main import main

main()

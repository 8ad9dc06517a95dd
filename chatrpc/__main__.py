from chatrpc.cli import main

main()

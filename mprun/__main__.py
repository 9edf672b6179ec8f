from mprun.cli import main

main()

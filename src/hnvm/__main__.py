from hnvm.cli import main

main()

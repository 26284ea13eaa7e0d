from rbd_restore.cli.main import main

main()

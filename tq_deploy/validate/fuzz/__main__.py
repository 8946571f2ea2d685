from tq_deploy.validate.fuzz.cli import main

raise SystemExit(main())

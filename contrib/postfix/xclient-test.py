#!/usr/bin/env python3
"""Ask Postfix what heloguard says about a client, through XCLIENT.

    contrib/postfix/xclient-test.py --ip 103.245.153.249 --helo mail.digitaljunction.com.au

Connects to Postfix (default 127.0.0.1:25; it must list this host in
smtpd_authorized_xclient_hosts), presents the client address and HELO with
XCLIENT, says EHLO and MAIL FROM, prints every reply and stops.  No mail is
sent.  Exit status 0 when MAIL FROM is accepted, 4 on a 4xx, 5 on a 5xx.
"""

from __future__ import annotations

import argparse
import smtplib
import sys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ip", required=True, help="client address to present")
    p.add_argument("--helo", required=True, help="HELO name to present")
    p.add_argument("--from", dest="sender", default="postmaster@example.org", help="MAIL FROM")
    p.add_argument("--server", default="127.0.0.1", help="Postfix's address")
    p.add_argument("--port", type=int, default=25, help="Postfix's SMTP port")
    args = p.parse_args()
    with smtplib.SMTP(args.server, args.port, timeout=30) as smtp:
        print(smtp.ehlo("xclient-test")[0])
        code, text = smtp.docmd("XCLIENT", f"NAME=[UNAVAILABLE] ADDR={args.ip} HELO={args.helo}")
        print(code, text.decode())
        print(smtp.ehlo(args.helo)[0])
        code, text = smtp.docmd("MAIL", f"FROM:<{args.sender}>")
        print(code, text.decode())
        smtp.docmd("QUIT")
    return 0 if code < 400 else code // 100


if __name__ == "__main__":
    sys.exit(main())

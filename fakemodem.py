#!/usr/bin/env python3
"""fakemodem: a GSM modem on a loopback TCP port, enough of one for smsd.

Try smsapi without a modem (README.md, "Try it without a modem"):

    python3 fakemodem.py [--port 5055]         the modem; logs what goes on the air
    python3 fakemodem.py smsd-conf [--port P]  an smsd.conf for it, on Debian's spool
    python3 fakemodem.py sms NUMBER TEXT       an SMS from NUMBER arrives in the modem

smsd reaches it with `device = @127.0.0.1:5055`. It answers the AT commands
smsd sends, decodes every SMS-SUBMIT (GSM 7-bit with its extension table,
UCS2, concatenated parts) and logs each whole message with its number, sends
back a status report when one is asked for (delivered), and keeps received
SMS in its memory until smsd reads and deletes them. The tests import it:
ModemEmulator and the PDU codecs below. Standard library only; it trusts
nothing smsd or a client sends it, and serves loopback only.
"""

import argparse
import socket
import sys
import threading
import time

DEFAULT_PORT = 5055

#: The GSM 03.38 default alphabet, 0x00-0x7F, and its extension table; this
#: file's own copy, so that a mistake in smsapi's tables cannot hide here.
GSM_TABLE = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM_EXT_TABLE = {
    0x0A: "\f",
    0x14: "^",
    0x28: "{",
    0x29: "}",
    0x2F: "\\",
    0x3C: "[",
    0x3D: "~",
    0x3E: "]",
    0x40: "|",
    0x65: "€",
}


def unpack_septets(data, count, skip_bits=0):
    bits = int.from_bytes(data, "little")
    return [(bits >> (skip_bits + 7 * i)) & 0x7F for i in range(count)]


def pack_septets(septets):
    bits = sum(s << (7 * i) for i, s in enumerate(septets))
    return bits.to_bytes((7 * len(septets) + 7) // 8, "little")


def gsm_decode(septets):
    """Decode one part as a phone would: a lone escape at the end is garbage."""
    out, escaped = [], False
    for septet in septets:
        if escaped:
            out.append(GSM_EXT_TABLE.get(septet, "\ufffd"))
            escaped = False
        elif septet == 0x1B:
            escaped = True
        else:
            out.append(GSM_TABLE[septet])
    return "".join(out) + ("\ufffd" if escaped else "")


def gsm_encode(text):
    """The septets of a text in the default alphabet; KeyError/ValueError if it has none."""
    ext = {char: code for code, char in GSM_EXT_TABLE.items()}
    septets = []
    for char in text:
        septets += [0x1B, ext[char]] if char in ext else [GSM_TABLE.index(char)]
    return septets


def semi_octets(digits):
    digits += "F" * (len(digits) % 2)
    return bytes(int(digits[i + 1] + digits[i], 16) for i in range(0, len(digits), 2))


def decode_submit(pdu_hex):
    """An SMS-SUBMIT PDU as smsd sends it: {to, mr, srr, dcs, udh, ucs2, payload}."""
    data = bytes.fromhex(pdu_hex)
    pos = data[0] + 1  # skip the SMSC address
    first, mr, da_digits = data[pos], data[pos + 1], data[pos + 2]
    da = data[pos + 4 : pos + 4 + (da_digits + 1) // 2]
    to = "".join(f"{b & 0xF:X}{b >> 4:X}" for b in da)[:da_digits]
    pos += 4 + len(da)
    dcs = data[pos + 1]
    pos += 2 + {0: 0, 2: 1, 1: 7, 3: 7}[(first >> 3) & 3]
    udl, ud = data[pos], data[pos + 1 :]
    udh = ud[: ud[0] + 1] if first & 0x40 else b""
    ucs2 = dcs & 0x0C == 0x08
    if ucs2:
        payload = ud[len(udh) : udl]
    else:
        header_septets = (len(udh) * 8 + 6) // 7
        payload = gsm_decode(
            unpack_septets(ud, udl - header_septets, header_septets * 7)
        )
    return {
        "to": to,
        "mr": mr,
        "srr": bool(first & 0x20),
        "dcs": dcs,
        "udh": udh,
        "ucs2": ucs2,
        "payload": payload,
    }


def concatenation(udh):
    """(reference, parts, this part) of a concatenated SMS's header, or None."""
    pos = 1
    while pos + 1 < len(udh):
        iei, length = udh[pos], udh[pos + 1]
        value = udh[pos + 2 : pos + 2 + length]
        if iei == 0x00 and length == 3:
            return value[0], value[1], value[2]
        if iei == 0x08 and length == 4:
            return value[0] << 8 | value[1], value[2], value[3]
        pos += 2 + length
    return None


def on_air_text(parts):
    """Join the parts of one message in UDH order; 7-bit parts decoded one by one."""
    parts = sorted(parts, key=lambda p: (concatenation(p["udh"]) or (0, 1, 1))[2])
    if all(p["ucs2"] for p in parts):
        return b"".join(p["payload"] for p in parts).decode("utf-16-be", "replace")
    if any(p["ucs2"] for p in parts):
        return "<mixed alphabets>"
    return "".join(p["payload"] for p in parts)


def timestamp_octets(when):
    fields = time.strftime("%y%m%d%H%M%S", time.localtime(when)) + "00"
    return semi_octets(fields)


def address_octets(number):
    """An international originating or destination address: length, type, digits."""
    return bytes([len(number), 0x91]) + semi_octets(number)


def deliver_pdu(sender, text, when):
    """An SMS-DELIVER PDU as a modem stores a received message (GSM or UCS2)."""
    try:
        septets = gsm_encode(text)
        dcs, udl, ud = 0x00, len(septets), pack_septets(septets)
    except (KeyError, ValueError):
        ud = text.encode("utf-16-be")
        dcs, udl = 0x08, len(ud)
    tpdu = (
        bytes([0x04])
        + address_octets(sender)
        + bytes([0x00, dcs])
        + timestamp_octets(when)
        + bytes([udl])
        + ud
    )
    return "00" + tpdu.hex().upper()


def deliver_parts(sender, text, when, reference=0x42):
    """The SMS-DELIVER PDUs of a long GSM text: 153 septets a part after a concatenation UDH."""
    septets = gsm_encode(text)
    chunks = [septets[i : i + 153] for i in range(0, len(septets), 153)]
    pdus = []
    for number, chunk in enumerate(chunks, 1):
        udh = bytes([5, 0, 3, reference, len(chunks), number])  # 48 bits, 1 fill bit
        bits = int.from_bytes(udh, "little")
        bits |= sum(septet << (49 + 7 * i) for i, septet in enumerate(chunk))
        udl = 7 + len(chunk)  # in septets, the header's included
        tpdu = bytes([0x44]) + address_octets(sender) + bytes([0x00, 0x00])
        tpdu += timestamp_octets(when) + bytes([udl])
        tpdu += bits.to_bytes((7 * udl + 7) // 8, "little")
        pdus.append("00" + tpdu.hex().upper())
    return pdus


def received_pdus(sender, text, when):
    """What a modem stores when sender's text arrives: one PDU, or a long GSM
    text's parts."""
    try:
        if len(gsm_encode(text)) > 160:
            return deliver_parts(sender, text, when)
    except (KeyError, ValueError):
        pass
    return [deliver_pdu(sender, text, when)]


def status_report_pdu(mr, recipient, delivered, when):
    """An SMS-STATUS-REPORT PDU for message reference mr."""
    status = 0x00 if delivered else 0x46  # 70: validity period expired
    tpdu = (
        bytes([0x06, mr])
        + address_octets(recipient)
        + timestamp_octets(when)
        + timestamp_octets(when + 5)
        + bytes([status])
    )
    return "00" + tpdu.hex().upper()


class ModemEmulator:
    """A GSM modem on a loopback TCP port that speaks enough AT for smsd.

    It records every SMS-SUBMIT (and logs each whole message through say),
    fails sends to numbers in `fail`, stores SMS-DELIVER PDUs for smsd to
    read, and files a status report for each submit that asked for one
    (delivered unless the number is in `undelivered`). It records the numbers
    smsd dials (a voice call: ATD), answering each call, and rings smsd with
    RING and +CLIP for a call coming in. A line starting FAKEMODEM on its port
    is a command of this file's own (an SMS arriving, a call coming in).
    """

    SLOTS = 60  # SIM storage: room for the parts of a long SMS

    def __init__(self, port=0, say=None):
        self.server = socket.create_server(("127.0.0.1", port))
        self.port = self.server.getsockname()[1]
        self.say = say or (lambda line: None)
        self.lock = threading.Lock()
        self.submits = []  # decoded SMS-SUBMITs, in order
        self.fail, self.undelivered = set(), set()
        self.storage = {}  # SIM index -> PDU hex
        self.hold_reports, self.held = False, []  # status reports kept back
        self.pending = {}  # (number, reference) -> parts of a message not yet whole
        self.mr = 0
        self.dialled = []  # the numbers smsd called, in order
        self.connections = set()  # smsd's, to ring
        self.sending = threading.Lock()  # one writer at a time on a connection
        self.closed = False
        threading.Thread(target=self.accept, daemon=True).start()

    def close(self):
        self.closed = True
        self.server.close()

    def store(self, pdu):
        with self.lock:
            index = next(i for i in range(1, self.SLOTS + 1) if i not in self.storage)
            self.storage[index] = pdu

    def receive(self, sender, text):
        """An SMS from sender arrives: its PDUs go into the SIM for smsd to read."""
        for pdu in received_pdus(sender, text, time.time()):
            self.store(pdu)
        self.say(f"received from {sender}: {text}")

    def ring(self, caller):
        """A call from caller comes in: RING and +CLIP, as a modem told AT+CLIP=1
        says them; smsd (phonecalls = clip) hangs up and files a missed call."""
        with self.lock:
            connections = list(self.connections)
        for conn in connections:
            self.send(conn, f'\r\nRING\r\n\r\n+CLIP: "{caller}",145,,,,0\r\n')
        self.say(f"call from {caller}: ringing")

    def send(self, conn, text):
        with self.sending:
            conn.sendall(text.encode("latin-1"))

    def release_reports(self, reverse=False):
        """Put the held status reports into storage, newest first if reverse."""
        self.hold_reports = False
        for pdu in reversed(self.held) if reverse else self.held:
            self.store(pdu)
        self.held = []

    def parts_to(self, number):
        with self.lock:
            return [s for s in self.submits if s["to"] == number]

    def accept(self):
        while not self.closed:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn):
        with self.lock:
            self.connections.add(conn)
        try:
            self.converse(conn)
        finally:
            with self.lock:
                self.connections.discard(conn)

    def converse(self, conn):
        buffer = b""
        with conn:
            while not self.closed:
                try:
                    chunk = conn.recv(4096)
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
                while b"\r" in buffer:
                    line, buffer = buffer.split(b"\r", 1)
                    command = line.strip().decode("latin-1")
                    if not command:
                        continue
                    if command.upper().startswith("AT+CMGS="):
                        self.send(conn, "\r\n> ")
                        while b"\x1a" not in buffer:
                            more = conn.recv(4096)
                            if not more:
                                return
                            buffer += more
                        pdu, buffer = buffer.split(b"\x1a", 1)
                        self.send(conn, self.submit(pdu.strip().decode()))
                    elif command.startswith("FAKEMODEM "):
                        with self.lock:  # a command line's connection is not smsd's
                            self.connections.discard(conn)
                        self.send(conn, self.control(command.split()[1:]))
                    else:
                        self.send(conn, self.answer(command.upper()))

    def control(self, words):
        """A command of this file's own: SMS NUMBER HEX-OF-UTF-8-TEXT, or CALL NUMBER."""
        if len(words) < 2 or not words[1].isdigit() or not 3 <= len(words[1]) <= 15:
            return "ERROR\r\n"
        verb, number, rest = words[0], words[1], words[2:]
        if verb == "CALL" and not rest:
            self.ring(number)
            return "OK\r\n"
        if verb != "SMS" or len(rest) != 1:
            return "ERROR\r\n"
        try:
            text = bytes.fromhex(rest[0]).decode("utf-8")
        except ValueError:
            return "ERROR\r\n"
        self.receive(number, text)
        return "OK\r\n"

    def submit(self, pdu):
        try:
            info = decode_submit(pdu)
        except (ValueError, IndexError, KeyError):
            return "\r\n+CMS ERROR: 304\r\n"  # invalid PDU parameter
        with self.lock:
            self.submits.append(info)
            if info["to"] in self.fail:
                self.say(f"refused to {info['to']} (+CMS ERROR: 500)")
                return "\r\n+CMS ERROR: 500\r\n"
            self.mr = (self.mr + 1) % 256
            mr = self.mr
            whole = self.whole(info)
        if whole:
            kind = "UCS2" if whole[0]["ucs2"] else "GSM"
            parts = f"{len(whole)} part{'s' if len(whole) > 1 else ''}"
            self.say(f"sent to {info['to']} ({kind}, {parts}): {on_air_text(whole)}")
        if info["srr"]:
            delivered = info["to"] not in self.undelivered
            report = status_report_pdu(mr, info["to"], delivered, time.time())
            if self.hold_reports:
                self.held.append(report)
            else:
                self.store(report)
                outcome = "delivered" if delivered else "not delivered"
                self.say(f"status report for {info['to']} (reference {mr}): {outcome}")
        return f"\r\n+CMGS: {mr}\r\n\r\nOK\r\n"

    def whole(self, info):
        """The parts of the message info completes, or None while some are missing."""
        concat = concatenation(info["udh"])
        if concat is None:
            return [info]
        reference, count, _ = concat
        parts = self.pending.setdefault((info["to"], reference), [])
        parts.append(info)
        if len(parts) < count:
            return None
        return self.pending.pop((info["to"], reference))

    def answer(self, command):
        ok = "\r\nOK\r\n"
        if command.startswith("AT+CSQ"):
            return "\r\n+CSQ: 20,99\r\n" + ok
        if command.startswith("AT+CREG?"):
            return '\r\n+CREG: 2,1,"00C3","1234"\r\n' + ok
        if command.startswith("AT+CPMS?"):
            with self.lock:
                used = len(self.storage)
            slots = self.SLOTS
            return (
                f'\r\n+CPMS: "SM",{used},{slots},"SM",{used},{slots},"SM",{used},{slots}\r\n'
                + ok
            )
        if command.startswith("AT+CGSN"):
            return "\r\n356938035643809\r\n" + ok
        if command.startswith("AT+CIMI"):
            return "\r\n244070123456789\r\n" + ok
        if command.startswith("AT+CMGR="):
            with self.lock:
                pdu = self.storage.get(number_after(command, "AT+CMGR="))
            if pdu is None:
                return ok
            return f"\r\n+CMGR: 0,,{len(pdu) // 2 - 1}\r\n{pdu}\r\n" + ok
        if command.startswith("AT+CMGD="):
            with self.lock:
                self.storage.pop(number_after(command, "AT+CMGD="), None)
        if command.startswith("ATD"):  # a voice call: it is answered at once
            number = command[3:].rstrip(";").strip().lstrip("+")
            with self.lock:
                self.dialled.append(number)
            self.say(f"dialled {number}")
        return ok


def number_after(command, prefix):
    """The index a command names after its prefix (up to a comma), or None."""
    digits = command[len(prefix) :].split(",")[0].strip()
    return int(digits) if digits.isdigit() and len(digits) < 6 else None


#: smsd.conf for trying smsapi with this modem: Debian's own spool, log and pid
#: file (its init script uses them), the modem on loopback, received texts as
#: UTF-8, and each modem's delivery reports asked for by smsapi's "report".
SMSD_CONF = """\
# smsd.conf for fakemodem.py (python3 fakemodem.py smsd-conf): an emulated
# modem on 127.0.0.1:{port}. Keep your own: sudo cp /etc/smsd.conf /etc/smsd.conf.orig
devices = GSM1
outgoing = /var/spool/sms/outgoing
checked = /var/spool/sms/checked
failed = /var/spool/sms/failed
incoming = /var/spool/sms/incoming
sent = /var/spool/sms/sent
logfile = /var/log/smstools/smsd.log
infofile = /var/run/smstools/smsd.working
pidfile = /var/run/smstools/smsd.pid
stats = /var/log/smstools/smsd_stats
incoming_utf8 = yes
receive_before_send = no
autosplit = 3
delaytime = 2
delaytime_mainprocess = 2

[GSM1]
device = @127.0.0.1:{port}
incoming = yes
"""


def send_command(port, words):
    """Send one FAKEMODEM command to the modem on port; its answer line."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(("FAKEMODEM " + " ".join(words) + "\r").encode())
        return conn.recv(1024).decode("latin-1").strip()


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="fakemodem.py", description="An emulated GSM modem for smsd, on loopback."
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("smsd-conf", help="print an smsd.conf that uses this modem")
    sms = commands.add_parser("sms", help="an SMS arrives in the modem")
    sms.add_argument("number", help="the sender, international format")
    sms.add_argument("text")
    call = commands.add_parser("call", help="a call comes in (smsd: phonecalls = clip)")
    call.add_argument("number", help="the caller, international format")
    args = parser.parse_args(argv)
    if args.command == "smsd-conf":
        print(SMSD_CONF.format(port=args.port), end="")
        return 0
    if args.command == "sms":
        number = args.number.lstrip("+")
        answer = send_command(args.port, ["SMS", number, args.text.encode().hex()])
        print(f"from {number}: {'in the modem' if answer == 'OK' else answer}")
        return 0 if answer == "OK" else 1
    if args.command == "call":
        number = args.number.lstrip("+")
        answer = send_command(args.port, ["CALL", number])
        print(f"call from {number}: {'ringing' if answer == 'OK' else answer}")
        return 0 if answer == "OK" else 1
    modem = ModemEmulator(args.port, lambda line: print(line, flush=True))
    print(
        f"fakemodem on 127.0.0.1:{modem.port}: smsd's device = @127.0.0.1:{modem.port}",
        flush=True,
    )
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        modem.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Header sets shaped like those of real MTAs and list servers, with the ISP's trusted hop on top.

Each case is what mbox4711 on pop.isp.example.net would hold: the sender's chain at the bottom, the
ISP's `by mx.isp.example.net` Received above it, and whatever the ISP's delivery added on top.
Addresses and hosts are illustrative; the shapes (folding, comments, field order) are the MTAs'.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest

from services.router.headers import envelope_sender, message_id
from services.router.rules import resolve
from services.runtime.settings import RoutingRules


class Case(NamedTuple):
    header: str  # header lines joined with "\n"; turned into CRLF (or kept LF) by `raw`
    recipients: tuple[str, ...]
    reason: str


def raw(case: Case, eol: str = "\r\n") -> bytes:
    header = case.header.strip("\n").replace("\n", eol)
    return (header + eol + eol + "Body text." + eol).encode()


POSTFIX = Case(
    """
Return-Path: <jdoe@partner.example>
Delivered-To: mbox4711@isp.example.net
Received: from mx.isp.example.net
	by pop.isp.example.net with LMTP
	id 8Bq3GQ3qRWcNLgAAm8x3Tg
	(envelope-from <jdoe@partner.example>)
	for <mbox4711@isp.example.net>; Thu, 26 Nov 2026 10:00:01 +0100
X-Original-To: alice@example.com
Received: from mail.partner.example (mail.partner.example [198.51.100.25])
	(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)
	key-exchange X25519 server-signature RSA-PSS (2048 bits) server-digest SHA256)
	(No client certificate requested)
	by mx.isp.example.net (Postfix) with ESMTPS id 4Zb3xK0mQvz9sWq
	for <alice@example.com>; Thu, 26 Nov 2026 10:00:00 +0100 (CET)
Received: from workstation.partner.example (unknown [10.1.2.3])
	(Authenticated sender: jdoe)
	by mail.partner.example (Postfix) with ESMTPSA id 7C1F2A0123
	for <alice@example.com>; Thu, 26 Nov 2026 09:59:58 +0100 (CET)
DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=partner.example;
	s=mail; t=1764147597; bh=frcCV1k9oG9oKj3dpUqdJg1PxRT2RSN/XKdLCPjaYaY=;
	h=Date:From:To:Subject; b=Zm9vYmFy
Date: Thu, 26 Nov 2026 09:59:57 +0100
From: John Doe <jdoe@partner.example>
To: Bob <bob@example.com>
Subject: Quarterly figures
Message-ID: <20261126085957.GA1234@partner.example>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii
Content-Disposition: inline
""",
    ("alice@example.com",),  # a Bcc: To names bob, the envelope names alice
    "x-original-to",
)

EXIM = Case(
    """
Return-path: <carol.sender@uni.example>
Envelope-to: Bob+Lists@example.com
Delivery-date: Thu, 26 Nov 2026 10:00:02 +0100
Received: from mail.uni.example ([203.0.113.40] helo=smtp-out.uni.example)
	by mx.isp.example.net with esmtps  (TLS1.3) tls TLS_AES_256_GCM_SHA384
	(Exim 4.97)
	(envelope-from <carol.sender@uni.example>)
	id 1tG7xY-00A1bC-2k
	for Bob+Lists@example.com; Thu, 26 Nov 2026 10:00:02 +0100
Received: from [10.20.30.40] (helo=laptop.uni.example)
	by smtp-out.uni.example with esmtpsa  (TLS1.3) tls TLS_AES_128_GCM_SHA256
	(Exim 4.96)
	(envelope-from <carol.sender@uni.example>)
	id 1tG7xW-0003Qa-1b;
	Thu, 26 Nov 2026 10:00:00 +0100
Message-ID: <a1b2c3d4-e5f6-7890-abcd-ef0123456789@uni.example>
Date: Thu, 26 Nov 2026 10:00:00 +0100
MIME-Version: 1.0
User-Agent: Mozilla Thunderbird
To: team@uni.example
Cc: alice@example.com
From: Carol Sender <carol.sender@uni.example>
Subject: Workshop
Content-Type: text/plain; charset=UTF-8; format=flowed
Content-Transfer-Encoding: 7bit
X-Spam-Score: -0.1 (/)
""",
    ("bob@example.com",),
    "envelope-to",
)

SENDMAIL = Case(
    """
Return-Path: <owner@shop.example>
Received: from relay.shop.example (relay.shop.example [192.0.2.77])
	by mx.isp.example.net (8.17.2/8.17.2) with ESMTPS id 5AQ9x0Ab012345
	(version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384 bits=256 verify=NOT)
	for <Dave+orders@example.org>; Thu, 26 Nov 2026 10:00:00 +0100
Received: from shop.example (localhost [127.0.0.1])
	by relay.shop.example (8.15.2/8.15.2) with ESMTP id 5AQ8xZZa001122
	for <alice@example.com>; Thu, 26 Nov 2026 09:59:59 +0100
Received: (from www@localhost)
	by shop.example (8.15.2/8.15.2/Submit) id 5AQ8xZ01001121;
	Thu, 26 Nov 2026 09:59:59 +0100
X-Original-To: alice@example.com
Date: Thu, 26 Nov 2026 09:59:59 +0100
Message-Id: <202611260859.5AQ8xZ01001121@shop.example>
X-Authentication-Warning: shop.example: www set sender to owner@shop.example using -f
From: Shop <orders@shop.example>
To: customer-list@shop.example
Subject: Your order 4711
""",
    ("dave@example.com",),  # the X-Original-To and the for clause below the ISP's hop are the sender's
    "received-for",
)

QMAIL = Case(
    """
Return-Path: <sender@qmail-user.example>
Delivered-To: mbox4711-erin@example.com
Received: (qmail 28711 invoked by uid 89); 26 Nov 2026 09:00:01 -0000
Received: from unknown (HELO mail.qmail-user.example) (198.51.100.81)
  by mx.isp.example.net with SMTP; 26 Nov 2026 09:00:01 -0000
Delivered-To: frank@example.com
Received: (qmail 1234 invoked from network); 26 Nov 2026 09:00:00 -0000
Received: from unknown (HELO ?192.168.1.20?) (sender@qmail-user.example@203.0.113.5)
  by mail.qmail-user.example with ESMTPA; 26 Nov 2026 09:00:00 -0000
Message-ID: <5F1A2B3C.4D5E6F70@qmail-user.example>
Date: Thu, 26 Nov 2026 10:00:00 +0100
From: Sender <sender@qmail-user.example>
To: erin@example.com, frank@example.com
Subject: Photos
""",
    ("erin@example.com",),
    "delivered-to",
)

EXCHANGE_ONLINE = Case(
    """
Return-Path: <erin.partner@contoso.example>
Received: from EUR05-DB8-obe.outbound.protection.outlook.com
	(mail-db8eur05on2071.outbound.protection.outlook.com [40.107.20.71])
	by mx.isp.example.net (Postfix) with ESMTPS id 4Zb3y10P1Nz9sWr;
	Thu, 26 Nov 2026 10:00:00 +0100 (CET)
ARC-Seal: i=1; a=rsa-sha256; s=arcselector10001; d=microsoft.com; cv=none;
 b=QmFzZTY0U2lnbmF0dXJl
ARC-Message-Signature: i=1; a=rsa-sha256; c=relaxed/relaxed; d=microsoft.com;
 s=arcselector10001;
 h=From:Date:Subject:Message-ID:Content-Type:MIME-Version:X-MS-Exchange-AntiSpam-MessageData-ChunkCount:X-MS-Exchange-AntiSpam-MessageData-0;
 bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=; b=U2lnbmF0dXJl
ARC-Authentication-Results: i=1; mx.microsoft.com 1; spf=pass
 smtp.mailfrom=contoso.example; dmarc=pass action=none
 header.from=contoso.example; dkim=pass header.d=contoso.example; arc=none
Received: from AS8PR07MB7976.eurprd07.prod.outlook.com (2603:10a6:20b:396::12)
 by DB9PR07MB8711.eurprd07.prod.outlook.com (2603:10a6:10:30c::20) with
 Microsoft SMTP Server (version=TLS1_2,
 cipher=TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384) id 15.20.8207.12; Thu, 26 Nov
 2026 09:00:00 +0000
Received: from AS8PR07MB7976.eurprd07.prod.outlook.com
 ([fe80::1c2d:3e4f:5a6b:7c8d]) by AS8PR07MB7976.eurprd07.prod.outlook.com
 ([fe80::1c2d:3e4f:5a6b:7c8d%6]) with mapi id 15.20.8207.010; Thu, 26 Nov 2026
 09:00:00 +0000
From: Erin Partner <erin.partner@contoso.example>
To: "Mueller, Frank" <Frank@xn--mller-kva.example>, Sales
	<sales@example.com>
CC: External <someone@fabrikam.example>
Subject: Offer
Thread-Topic: Offer
Thread-Index: AQHbP0xYzQ1a2b3c4d5e6f7g8h9i0j==
Date: Thu, 26 Nov 2026 09:00:00 +0000
Message-ID: <AS8PR07MB79761A2B3C4D5E6F7@AS8PR07MB7976.eurprd07.prod.outlook.com>
Accept-Language: de-DE, en-US
Content-Language: de-DE
X-MS-Has-Attach:
X-MS-TNEF-Correlator:
authentication-results: dkim=none (message not signed)
 header.d=none;dmarc=none action=none header.from=contoso.example;
x-ms-publictraffictype: Email
x-ms-traffictypediagnostic: AS8PR07MB7976:EE_|DB9PR07MB8711:EE_
x-ms-office365-filtering-correlation-id: 5d1f2e3a-4b5c-6d7e-8f90-a1b2c3d4e5f6
x-ms-exchange-senderadcheck: 1
x-ms-exchange-antispam-relay: 0
x-microsoft-antispam: BCL:0;ARA:13230040|1800799024|366016|376014|38070700018;
X-MS-Exchange-Organization-OriginalEnvelopeRecipients: alice@example.com
Content-Type: text/plain; charset="iso-8859-1"
Content-Transfer-Encoding: quoted-printable
MIME-Version: 1.0
X-OriginatorOrg: contoso.example
X-MS-Exchange-CrossTenant-AuthAs: Internal
X-MS-Exchange-CrossTenant-AuthSource: AS8PR07MB7976.eurprd07.prod.outlook.com
X-MS-Exchange-CrossTenant-Network-Message-Id: 5d1f2e3a-4b5c-6d7e-8f90-a1b2c3d4e5f6
X-MS-Exchange-CrossTenant-originalarrivaltime: 26 Nov 2026 09:00:00.0000 (UTC)
X-MS-Exchange-CrossTenant-fromentityheader: Hosted
X-MS-Exchange-CrossTenant-id: 72f988bf-86f1-41af-91ab-2d7cd011db47
X-MS-Exchange-CrossTenant-mailboxtype: HOSTED
X-MS-Exchange-Transport-CrossTenantHeadersStamped: DB9PR07MB8711
""",
    # Several recipients, so the ISP's Postfix wrote no `for`, and this ISP adds no envelope header.
    ("alice@example.com", "bob@example.com", "frank@example.com"),
    "to-cc-fallback",
)

GMAIL = Case(
    """
Return-Path: <someone.private@gmail.com>
Delivered-To: mbox4711@isp.example.net
Received: from mail-wm1-f41.google.com (mail-wm1-f41.google.com [209.85.128.41])
	(using TLSv1.3 with cipher TLS_AES_128_GCM_SHA256 (128/128 bits)
	key-exchange X25519 server-signature RSA-PSS (2048 bits) server-digest SHA256)
	(No client certificate requested)
	by mx.isp.example.net (Postfix) with ESMTPS id 4Zb3y2Wq1sz9sWs
	for <Info@Example.ORG>; Thu, 26 Nov 2026 10:00:00 +0100 (CET)
Received: by mail-wm1-f41.google.com with SMTP id 5b1f17b1804b1-4349cc12fd6so1234565e9.1
        for <info@example.org>; Thu, 26 Nov 2026 01:00:00 -0800 (PST)
DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;
        d=gmail.com; s=20230601; t=1764147600; x=1764752400; darn=example.org;
        h=to:subject:message-id:date:from:mime-version:from:to:cc:subject
         :date:message-id:reply-to;
        bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=;
        b=U2lnbmF0dXJlQmFzZTY0
X-Gm-Message-State: AOJu0YzAbCdEfGhIjKlMnOpQrStUvWxYz
X-Google-Smtp-Source: AGHT+IFabcdefGHIJKLmnopqrSTUVwxyz
X-Received: by 2002:a05:600c:4f0b:b0:434:a7e3:db5c with SMTP id
 5b1f17b1804b1-434a9de8e8cmr1234567f8f.41.1764147600123;
        Thu, 26 Nov 2026 01:00:00 -0800 (PST)
MIME-Version: 1.0
From: Private Person <someone.private@gmail.com>
Date: Thu, 26 Nov 2026 10:00:00 +0100
Message-ID: <CAFx1a2b3C4d5E6f7G8h9I0j-kLmNoPqRsTuVwXyZ@mail.gmail.com>
Subject: =?UTF-8?Q?Frage_zu_Ihrem_Produkt?=
To: =?UTF-8?Q?Info_M=C3=BCller?= <info@example.org>
Content-Type: multipart/alternative; boundary="0000000000001a2b3c0627abcdef"
""",
    ("carol@example.com",),  # the Delivered-To names only the ISP mailbox; info is an alias of carol
    "received-for",
)

GOOGLE_GROUPS = Case(
    """
Return-Path: <team-discuss+bncBDabc123@googlegroups.com>
Delivered-To: mbox4711@isp.example.net
X-Original-To: frank+groups@example.com
Received: from mail-sor-f69.google.com (mail-sor-f69.google.com [209.85.220.69])
	by mx.isp.example.net (Postfix) with ESMTPS id 4Zb3y3Xr2tz9sWt
	for <frank+groups@example.com>; Thu, 26 Nov 2026 10:00:00 +0100 (CET)
Received: by mail-sor-f69.google.com with SMTP id 46e09a7af769-71e1e1a2b3cso1234567a34.2
        for <frank+groups@example.com>; Thu, 26 Nov 2026 01:00:00 -0800 (PST)
ARC-Seal: i=2; a=rsa-sha256; t=1764147600; cv=pass;
        d=google.com; s=arc-20240605;
        b=QVJDU2VhbA==
X-BeenThere: team-discuss@googlegroups.com
Received: by 2002:a05:6870:d1c2:b0:29e:4c1a:1234 with SMTP id
 586e51a60fabf-29e4c1a5678ls123456fac.2.-pod-prod-01-us;
 Thu, 26 Nov 2026 01:00:00 -0800 (PST)
Received: from mail.member.example (mail.member.example. [198.51.100.90])
        by gmr-mx.google.com with ESMTPS id 5b1f17b1804b1-434a1234567si123456f8f.3.2026.11.26.01.00.00
        for <team-discuss@googlegroups.com>
        (version=TLS1_3 cipher=TLS_AES_256_GCM_SHA384 bits=256/256);
        Thu, 26 Nov 2026 01:00:00 -0800 (PST)
From: Member <member@member.example>
To: team-discuss@googlegroups.com
Cc: alice@example.com
Subject: [team-discuss] Meeting notes
Date: Thu, 26 Nov 2026 09:59:00 +0000
Message-ID: <1234abcd-5678-ef90@member.example>
X-Original-Sender: member@member.example
X-Original-Authentication-Results: gmr-mx.google.com;       dkim=pass header.i=@member.example
Precedence: list
Mailing-list: list team-discuss@googlegroups.com; contact team-discuss+owners@googlegroups.com
List-ID: <team-discuss.googlegroups.com>
X-Spam-Checked-In-Group: team-discuss@googlegroups.com
X-Google-Group-Id: 123456789012
List-Post: <https://groups.google.com/group/team-discuss/post>, <mailto:team-discuss@googlegroups.com>
List-Help: <https://support.google.com/a/users/answer/9308781>, <mailto:team-discuss+help@googlegroups.com>
List-Archive: <https://groups.google.com/group/team-discuss
List-Unsubscribe: <mailto:googlegroups-manage+123456789012+unsubscribe@googlegroups.com>,
 <https://groups.google.com/group/team-discuss/subscribe>
""",
    ("frank@example.com",),  # no list rule for this List-ID: the envelope decides
    "x-original-to",
)

MAILMAN = Case(
    """
Return-Path: <announce-bounces+alice=example.com@lists.example.net>
Delivered-To: mbox4711@isp.example.net
X-Original-To: alice@example.com
Received: from lists.example.net (lists.example.net [203.0.113.50])
	by mx.isp.example.net (Postfix) with ESMTP id 4Zb3y4Ys3vz9sWv
	for <alice@example.com>; Thu, 26 Nov 2026 10:00:00 +0100 (CET)
Received: from lists.example.net (localhost [127.0.0.1])
	by lists.example.net (Postfix) with ESMTP id 1A2B3C4D5E;
	Thu, 26 Nov 2026 10:00:00 +0100 (CET)
Received: from mail.org.example (mail.org.example [198.51.100.60])
	by lists.example.net (Postfix) with ESMTPS id 6F7A8B9C0D
	for <announce@lists.example.net>; Thu, 26 Nov 2026 09:59:59 +0100 (CET)
From: Board <board@org.example>
To: announce@lists.example.net
Subject: [Announce] General meeting
Date: Thu, 26 Nov 2026 09:59:58 +0100
Message-ID: <0f1e2d3c-4b5a-6978@org.example>
X-BeenThere: announce@lists.example.net
X-Mailman-Version: 2.1.39
Precedence: list
List-Id: Announcements of the Example Society <announce.lists.example.net>
List-Unsubscribe: <https://lists.example.net/mailman/options/announce>,
 <mailto:announce-request@lists.example.net?subject=unsubscribe>
List-Archive: <https://lists.example.net/pipermail/announce/>
List-Post: <mailto:announce@lists.example.net>
List-Help: <mailto:announce-request@lists.example.net?subject=help>
List-Subscribe: <https://lists.example.net/mailman/listinfo/announce>,
 <mailto:announce-request@lists.example.net?subject=subscribe>
Errors-To: announce-bounces+alice=example.com@lists.example.net
Sender: "Announce" <announce-bounces+alice=example.com@lists.example.net>
""",
    ("lists@example.com",),
    "list-id",
)

MAILMAN3 = Case(
    """
Return-Path: <dev-bounces@lists.example.net>
X-Envelope-To: <Bob@example.com>
Received: from mail.lists.example.net (mail.lists.example.net [203.0.113.52])
	by mx.isp.example.net (Postfix) with ESMTPS id 4Zb3y6Zu5xz9sWx
	for <bob@example.com>; Thu, 26 Nov 2026 10:00:00 +0100 (CET)
Received: from mail.lists.example.net (localhost [IPv6:::1])
	by mail.lists.example.net (Postfix) with ESMTP id 2B3C4D5E6F;
	Thu, 26 Nov 2026 10:00:00 +0100 (CET)
From: Dev <dev@contributor.example>
To: dev@lists.example.net
Subject: [Dev] Release 2.0
Date: Thu, 26 Nov 2026 09:59:00 +0100
Message-ID: <5a6b7c8d@contributor.example>
Message-ID-Hash: ABCDEFGHIJKLMNOPQRSTUVWXYZ234567
X-Message-ID-Hash: ABCDEFGHIJKLMNOPQRSTUVWXYZ234567
X-MailFrom: dev@contributor.example
X-Mailman-Rule-Misses: dmarc-mitigation; no-senders; approved; emergency; loop; banned-address;
 member-moderation; header-match-dev.lists.example.net-0; nonmember-moderation; administrivia;
 implicit-dest; max-recipients; max-size; news-moderation; no-subject; digests; suspicious-header
X-Mailman-Version: 3.3.9
Precedence: list
List-Id: Developers <dev.lists.example.net>
Archived-At: <https://lists.example.net/archives/list/dev@lists.example.net/message/ABCDEFGH/>
List-Archive: <https://lists.example.net/archives/list/dev@lists.example.net/>
List-Help: <mailto:dev-request@lists.example.net?subject=help>
List-Owner: <mailto:dev-owner@lists.example.net>
List-Post: <mailto:dev@lists.example.net>
List-Subscribe: <mailto:dev-join@lists.example.net>
List-Unsubscribe: <mailto:dev-leave@lists.example.net>
""",
    ("bob@example.com",),  # dev.lists.example.net is not a configured list
    "x-envelope-to",
)

SYMPA = Case(
    """
Return-Path: <sciences-owner@lists.example.net>
X-RCPT-TO: <John.Smith@example.com>
Received: from sympa.lists.example.net (sympa.lists.example.net [203.0.113.51])
	by mx.isp.example.net with ESMTP id 1tG7xZ-00A1bD-3m
	for <John.Smith@example.com>; Thu, 26 Nov 2026 10:00:00 +0100
Received: from sympa.lists.example.net (localhost [127.0.0.1])
	by sympa.lists.example.net (Postfix) with ESMTP id 9A8B7C6D5E;
	Thu, 26 Nov 2026 10:00:00 +0100 (CET)
From: Researcher <researcher@uni.example>
To: sciences@lists.example.net
Subject: [sciences] Call for papers
Date: Thu, 26 Nov 2026 09:58:00 +0100
Message-ID: <cfp-2027@uni.example>
X-Loop: sciences@lists.example.net
X-Sequence: 1842
Errors-To: sciences-owner@lists.example.net
Precedence: list
Precedence: bulk
Sender: sciences-request@lists.example.net
X-no-archive: yes
List-Id: <sciences.lists.example.net>
List-Help: <mailto:sympa@lists.example.net?subject=help>
List-Subscribe: <mailto:sympa@lists.example.net?subject=subscribe%20sciences>
List-Unsubscribe: <mailto:sympa@lists.example.net?subject=unsubscribe%20sciences>
List-Post: <mailto:sciences@lists.example.net>
List-Owner: <mailto:sciences-request@lists.example.net>
List-Archive: <https://lists.example.net/sympa/arc/sciences>
""",
    ("john.smith@example.com",),
    "x-rcpt-to",
)

FORGED_SPAM = Case(
    """
Return-Path: <bounce@spam.example>
Delivered-To: mbox4711@isp.example.net
Received: from spam.example (unknown [192.0.2.200])
	by mx.isp.example.net (Postfix) with ESMTP id 4Zb3y5Zt4wz9sWw
	for <mbox4711@isp.example.net>; Thu, 26 Nov 2026 10:00:00 +0100 (CET)
Delivered-To: sales@example.com
X-Original-To: sales@example.com
Received: from localhost by mx.isp.example.net (Postfix) with ESMTP id FAKE
	for <sales@example.com>; Thu, 26 Nov 2026 09:00:00 +0100 (CET)
List-Id: <announce.lists.example.net.spam.example>
From: "Prize Office" <winner@spam.example>
To: undisclosed-recipients:;
Subject: You have won
""",
    ("postmaster@example.com",),  # everything naming a local address was forged below the ISP's hop
    "postmaster-fallback",
)

CASES = {
    "postfix": POSTFIX,
    "exim": EXIM,
    "sendmail": SENDMAIL,
    "qmail": QMAIL,
    "exchange-online": EXCHANGE_ONLINE,
    "gmail": GMAIL,
    "google-groups": GOOGLE_GROUPS,
    "mailman": MAILMAN,
    "mailman3": MAILMAN3,
    "sympa": SYMPA,
    "forged-spam": FORGED_SPAM,
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_realistic_header_sets_route_as_the_spec_says(rules: RoutingRules, case: Case) -> None:
    decision = resolve(raw(case), rules)
    assert (decision.recipients, decision.reason) == (case.recipients, case.reason)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_lf_line_endings_route_the_same(rules: RoutingRules, case: Case) -> None:
    assert resolve(raw(case, "\n"), rules) == resolve(raw(case), rules)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_every_evidence_names_a_field_at_its_position(rules: RoutingRules, case: Case) -> None:
    decision = resolve(raw(case), rules)
    lines = [line for line in case.header.strip("\n").split("\n") if not line[:1].isspace()]
    for evidence in decision.evidence:
        if evidence.field_index is not None:
            assert lines[evidence.field_index].split(":", 1)[0] == evidence.field


def test_the_trusted_hop_is_named_in_envelope_evidence(rules: RoutingRules) -> None:
    (evidence,) = resolve(raw(QMAIL), rules).evidence
    assert (evidence.field, evidence.field_index, evidence.received_hop) == (
        "Delivered-To",
        1,
        "mx.isp.example.net",
    )


def test_sender_and_message_id_of_realistic_messages() -> None:
    assert envelope_sender(raw(MAILMAN)) == "announce-bounces+alice=example.com@lists.example.net"
    assert (
        message_id(raw(EXCHANGE_ONLINE))
        == "AS8PR07MB79761A2B3C4D5E6F7@AS8PR07MB7976.eurprd07.prod.outlook.com"
    )
    assert envelope_sender(raw(EXIM)) == "carol.sender@uni.example"

// Package ike encodes and decodes the IKEv2 messages (RFC 7296) that the
// director's health checks exchange with the terminator nodes: the IKE
// header, the generic payload chain, and the SA, KE, Nonce and Notify
// payloads of an IKE_SA_INIT exchange. It does no cryptography: a health
// probe never gets past the first exchange.
//
// Parse is strict, because a decoder that guesses would let a truncated or
// forged datagram count as a live node: the header's length must equal the
// datagram's, the payload chain must end exactly at the end, and every
// payload must fit. It never panics on any input (fuzzed).
package ike

import "fmt"

// HeaderLen is the size of the fixed IKE header.
const HeaderLen = 28

// payloadHeaderLen is the size of the generic payload header.
const payloadHeaderLen = 4

// MaxMessageLen bounds what Parse accepts: an IKE message over UDP never
// exceeds a datagram.
const MaxMessageLen = 65535

// PayloadType is the type of an IKEv2 payload ("Next Payload" values).
type PayloadType uint8

// Payload types (RFC 7296 section 3.2, RFC 7383).
const (
	PayloadNone    PayloadType = 0
	PayloadSA      PayloadType = 33
	PayloadKE      PayloadType = 34
	PayloadIDi     PayloadType = 35
	PayloadIDr     PayloadType = 36
	PayloadCERT    PayloadType = 37
	PayloadCERTREQ PayloadType = 38
	PayloadAUTH    PayloadType = 39
	PayloadNonce   PayloadType = 40
	PayloadNotify  PayloadType = 41
	PayloadDelete  PayloadType = 42
	PayloadVendor  PayloadType = 43
	PayloadTSi     PayloadType = 44
	PayloadTSr     PayloadType = 45
	PayloadSK      PayloadType = 46
	PayloadCP      PayloadType = 47
	PayloadEAP     PayloadType = 48
	PayloadSKF     PayloadType = 53
)

var payloadNames = map[PayloadType]string{
	PayloadSA: "SA", PayloadKE: "KE", PayloadIDi: "IDi", PayloadIDr: "IDr", PayloadCERT: "CERT",
	PayloadCERTREQ: "CERTREQ", PayloadAUTH: "AUTH", PayloadNonce: "No", PayloadNotify: "N",
	PayloadDelete: "D", PayloadVendor: "V", PayloadTSi: "TSi", PayloadTSr: "TSr", PayloadSK: "SK",
	PayloadCP: "CP", PayloadEAP: "EAP", PayloadSKF: "SKF",
}

func (t PayloadType) String() string {
	if s, ok := payloadNames[t]; ok {
		return s
	}
	return fmt.Sprintf("payload(%d)", uint8(t))
}

// ExchangeType is the IKEv2 exchange type of a message.
type ExchangeType uint8

// Exchange types (RFC 7296 section 3.1).
const (
	IKESAInit     ExchangeType = 34
	IKEAuth       ExchangeType = 35
	CreateChildSA ExchangeType = 36
	Informational ExchangeType = 37
)

func (e ExchangeType) String() string {
	switch e {
	case IKESAInit:
		return "IKE_SA_INIT"
	case IKEAuth:
		return "IKE_AUTH"
	case CreateChildSA:
		return "CREATE_CHILD_SA"
	case Informational:
		return "INFORMATIONAL"
	}
	return fmt.Sprintf("exchange(%d)", uint8(e))
}

// Header flags (RFC 7296 section 3.1).
const (
	FlagInitiator uint8 = 0x08
	FlagVersion   uint8 = 0x10
	FlagResponse  uint8 = 0x20
)

// Version2 is the version octet of IKEv2 (major 2, minor 0).
const Version2 uint8 = 0x20

// NotifyType is the type of a Notify payload.
type NotifyType uint16

// Notify types the health checks look at (RFC 7296 section 3.10.1, RFC 5685,
// RFC 7383). Types below 16384 are errors, the others status.
const (
	UnsupportedCriticalPayload NotifyType = 1
	InvalidIKESPI              NotifyType = 4
	InvalidMajorVersion        NotifyType = 5
	InvalidSyntax              NotifyType = 7
	InvalidMessageID           NotifyType = 9
	InvalidSPI                 NotifyType = 11
	NoProposalChosen           NotifyType = 14
	InvalidKEPayload           NotifyType = 17
	AuthenticationFailed       NotifyType = 24
	TemporaryFailure           NotifyType = 43
	NATDetectionSourceIP       NotifyType = 16388
	NATDetectionDestinationIP  NotifyType = 16389
	Cookie                     NotifyType = 16390
	RedirectSupported          NotifyType = 16406
	Redirect                   NotifyType = 16407
	FragmentationSupported     NotifyType = 16430
	SignatureHashAlgorithms    NotifyType = 16431
)

var notifyNames = map[NotifyType]string{
	UnsupportedCriticalPayload: "UNSUPPORTED_CRITICAL_PAYLOAD", InvalidIKESPI: "INVALID_IKE_SPI",
	InvalidMajorVersion: "INVALID_MAJOR_VERSION", InvalidSyntax: "INVALID_SYNTAX",
	InvalidMessageID: "INVALID_MESSAGE_ID", InvalidSPI: "INVALID_SPI",
	NoProposalChosen: "NO_PROPOSAL_CHOSEN", InvalidKEPayload: "INVALID_KE_PAYLOAD",
	AuthenticationFailed: "AUTHENTICATION_FAILED", TemporaryFailure: "TEMPORARY_FAILURE",
	NATDetectionSourceIP: "NAT_DETECTION_SOURCE_IP", NATDetectionDestinationIP: "NAT_DETECTION_DESTINATION_IP",
	Cookie: "COOKIE", RedirectSupported: "REDIRECT_SUPPORTED", Redirect: "REDIRECT",
	FragmentationSupported: "IKEV2_FRAGMENTATION_SUPPORTED", SignatureHashAlgorithms: "SIGNATURE_HASH_ALGORITHMS",
}

func (n NotifyType) String() string {
	if s, ok := notifyNames[n]; ok {
		return s
	}
	return fmt.Sprintf("notify(%d)", uint16(n))
}

// IsError reports whether the notify type is an error type (below 16384).
func (n NotifyType) IsError() bool { return n < 16384 }

// Transform types (RFC 7296 section 3.3.2).
const (
	TransformENCR  uint8 = 1
	TransformPRF   uint8 = 2
	TransformINTEG uint8 = 3
	TransformDH    uint8 = 4
	TransformESN   uint8 = 5
)

// Transform IDs used by the probe's proposals.
const (
	EncrAESCBC    uint16 = 12
	EncrAESGCM16  uint16 = 20
	PRFSHA1       uint16 = 2
	PRFSHA256     uint16 = 5
	PRFSHA384     uint16 = 6
	IntegSHA1     uint16 = 2 // AUTH_HMAC_SHA1_96
	IntegSHA256   uint16 = 12
	IntegSHA384   uint16 = 13
	DHModp2048    uint16 = 14
	DHModp3072    uint16 = 15
	DHEcp256      uint16 = 19
	DHEcp384      uint16 = 20
	DHCurve25519  uint16 = 31
	AttrKeyLength uint16 = 14
)

// ProtocolIKE is the protocol ID of an IKE SA proposal.
const ProtocolIKE uint8 = 1

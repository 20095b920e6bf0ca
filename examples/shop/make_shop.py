"""Build the Maple & Moss Tea House customer-service dataset from its fact table (deterministic: same files every run).

    python examples/shop/make_shop.py        # writes conversations.jsonl, facts.jsonl and slots.json beside itself

The shop is fictional, so a pretrained model cannot know any of its facts: opening hours, address, return policy,
refund time, delivery times and fees, prices, membership, phone, gift wrapping and payment. Each fact has:
- the answers an agent gives (EN and ZH, a few wordings each),
- the questions customers ask in the training conversations (EN and ZH),
- held-out questions, worded differently from every training question, with the strings a correct answer must
  contain (facts.jsonl, scored by `chatforge eval MODEL --facts examples/shop/facts.jsonl`).
conversations.jsonl holds 200 conversations (100 EN, 100 ZH): 1-3 questions each (every training question of a fact,
~9 wordings per fact and language, is asked at least once), some with a greeting, a follow-up that leans on the
previous turn ("And on Sundays?"), a thank-you, and a system prompt in about a third of them.
slots.json lists interchangeable words (weekdays, greetings, product names) for `chatforge augment --slots`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from chatforge.eval.facts import normalise
from chatforge.io import atomic_write_text

HERE = Path(__file__).resolve().parent
N_PER_LANGUAGE = 100
SEED = 0

SYSTEM = {
    "en": ["You are the customer service assistant of Maple & Moss Tea House. Answer briefly and politely.",
           "You work at the Maple & Moss Tea House help desk. Be friendly and give exact facts."],
    "zh": ["你是枫苔茶舍的客服助手，请简洁、礼貌地回答顾客的问题。",
           "你在枫苔茶舍的客服台工作，回答要友好并给出准确的信息。"],
}

# fact id -> answers, training questions and held-out questions per language, and the strings a reply must contain.
FACTS: dict[str, dict] = {
    "hours_week": {
        "expect": {"en": ["9:00", "21:00"], "zh": ["9:00", "21:00"]},
        "answer": {"en": ["We're open Monday to Saturday from 9:00 to 21:00.",
                          "Our shop opens at 9:00 and closes at 21:00, Monday through Saturday."],
                   "zh": ["我们周一至周六的营业时间是9:00到21:00。",
                          "周一到周六，我们早上9:00开门，晚上21:00关门。"]},
        "ask": {"en": ["What are your opening hours?", "When are you open?", "What time do you open and close?",
                       "Are you open on Tuesday? What hours?"],
                "zh": ["你们的营业时间是什么？", "你们几点开门几点关门？", "请问店里什么时候营业？", "周二营业吗？几点到几点？"]},
        "test": {"en": ["I'd like to drop by on a Thursday after work. From when until when can I come in?",
                        "What's the earliest I can visit the shop on a Wednesday morning, and when do you shut?"],
                 "zh": ["我想周四下班后过去，你们开到几点？几点开门？", "周三上午最早几点能到店里？晚上几点关门？"]},
    },
    "hours_sun": {
        "expect": {"en": ["10:00", "18:00"], "zh": ["10:00", "18:00"]},
        "answer": {"en": ["On Sundays we open from 10:00 to 18:00.",
                          "Sunday hours are shorter: 10:00 to 18:00."],
                   "zh": ["周日的营业时间是10:00到18:00。", "星期天我们营业时间短一些，是10:00到18:00。"]},
        "ask": {"en": ["Are you open on Sundays?", "What are your Sunday hours?", "Can I come by on Sunday?"],
                "zh": ["周日开门吗？", "星期天几点营业？", "周日可以去店里吗？"]},
        "follow": {"en": "And on Sundays?", "zh": "那周日呢？"},
        "test": {"en": ["Planning a weekend visit, the Sunday one. What times does the shop keep that day?",
                        "Do you do Sunday trading, and between which hours?"],
                 "zh": ["这个礼拜天想去逛逛，当天是几点到几点？", "星期日你们几点开门，几点打烊？"]},
    },
    "address": {
        "expect": {"en": ["27 Lantern Street"], "zh": ["灯笼街27号"]},
        "answer": {"en": ["You'll find us at 27 Lantern Street in the Riverside District.",
                          "Our address is 27 Lantern Street, Riverside District."],
                   "zh": ["我们的地址是河畔区灯笼街27号。", "店铺位于河畔区灯笼街27号。"]},
        "ask": {"en": ["Where is your shop?", "What's your address?", "Where are you located?"],
                "zh": ["你们店在哪里？", "请问地址是什么？", "店铺在什么位置？"]},
        "test": {"en": ["I want to visit in person. Which street should I head to?",
                        "Could you tell me how to find the physical store, the exact street and number?"],
                 "zh": ["我想亲自去一趟，应该去哪条街？", "实体店的具体门牌号是多少？"]},
    },
    "return_window": {
        "expect": {"en": ["45 days"], "zh": ["45天"]},
        "answer": {"en": ["You can return unused items within 45 days of purchase, with the receipt.",
                          "Returns are accepted within 45 days, as long as the item is unused and you have the receipt."],
                   "zh": ["未使用的商品在购买后45天内凭收据可以退货。", "只要商品未使用并保留收据，45天内都可以退货。"]},
        "ask": {"en": ["What is your return policy?", "Can I return something I bought?", "How long do I have to return an item?"],
                "zh": ["你们的退货政策是什么？", "买的东西可以退吗？", "多长时间内可以退货？"]},
        "test": {"en": ["I bought a teapot a few weeks ago and changed my mind. Is there a deadline for sending it back?",
                        "If a gift turns out to be unwanted, how many days does the recipient have to bring it back?"],
                 "zh": ["我几周前买了个茶壶，现在不想要了，退回有期限吗？", "送人的礼物如果对方不喜欢，最晚多少天内能退？"]},
    },
    "refund_time": {
        "expect": {"en": ["7 business days"], "zh": ["7个工作日"]},
        "answer": {"en": ["Once we receive the return, the refund reaches your original payment method within 7 business days.",
                          "Refunds are made to the original payment method within 7 business days."],
                   "zh": ["收到退货后，退款会在7个工作日内退回原支付账户。", "退款会在7个工作日内原路返回。"]},
        "ask": {"en": ["How long does a refund take?", "When will I get my money back?", "How fast are refunds?"],
                "zh": ["退款要多久？", "钱什么时候能退回来？", "退款需要几天？"]},
        "follow": {"en": "And how long until I see the money?", "zh": "那退款多久能到账？"},
        "test": {"en": ["I already mailed my return. How soon should the money show up on my card?",
                        "After you get a returned parcel, what's the wait before the payment is reversed?"],
                 "zh": ["退货已经寄出了，钱大概多久能回到我卡上？", "你们收到退件以后，要等多久才能拿到退款？"]},
    },
    "delivery_std": {
        "expect": {"en": ["3 to 5 business days"], "zh": ["3到5个工作日"]},
        "answer": {"en": ["Standard delivery takes 3 to 5 business days and costs $6.",
                          "With standard shipping your order arrives in 3 to 5 business days; the fee is $6."],
                   "zh": ["普通快递3到5个工作日送达，运费6元。", "标准配送需要3到5个工作日，运费是6元。"]},
        "ask": {"en": ["How long does delivery take?", "When will my order arrive?", "How long is shipping?"],
                "zh": ["送货要多久？", "下单后多久能收到？", "快递几天到？"]},
        "test": {"en": ["If I order online today with the normal shipping option, when can I expect the parcel?",
                        "Roughly how many days is the regular courier from your warehouse to my door?"],
                 "zh": ["今天在网上下单，选普通配送的话什么时候能到？", "一般快递从你们仓库寄到我家大概要几天？"]},
    },
    "delivery_express": {
        "expect": {"en": ["15:00", "$12"], "zh": ["15:00", "12元"]},
        "answer": {"en": ["Express delivery costs $12 and arrives the next day if you order before 15:00.",
                          "Yes, express shipping: order before 15:00 and it arrives the next day, for $12."],
                   "zh": ["加急快递运费12元，15:00前下单次日送达。", "有的，选加急快递，15:00前下单第二天就到，运费12元。"]},
        "ask": {"en": ["Do you have express delivery?", "Can I get my order faster?", "Is there next-day shipping?"],
                "zh": ["有加急快递吗？", "能更快送到吗？", "可以次日达吗？"]},
        "follow": {"en": "Is there anything faster?", "zh": "有更快的吗？"},
        "test": {"en": ["I need a present by tomorrow. Is there a quicker option, what does it cost and when must I order?",
                        "What's the deal with your fastest shipping: price and order cut-off?"],
                 "zh": ["我明天就要用这个礼物，有没有更快的配送？多少钱，几点前要下单？", "最快的配送方式要多少钱？截单时间是几点？"]},
    },
    "free_shipping": {
        "expect": {"en": ["$199"], "zh": ["199元"]},
        "answer": {"en": ["Standard shipping is free on orders over $199.",
                          "Orders over $199 ship free with standard delivery."],
                   "zh": ["订单满199元免运费（普通快递）。", "满199元就包邮。"]},
        "ask": {"en": ["Do you offer free shipping?", "Is shipping ever free?", "How much do I need to spend for free delivery?"],
                "zh": ["有包邮吗？", "满多少免运费？", "怎样才能免运费？"]},
        "follow": {"en": "Can I avoid the shipping fee?", "zh": "运费可以免吗？"},
        "test": {"en": ["What's the minimum basket to skip paying for postage?",
                        "My cart is small; at what total does delivery stop costing anything?"],
                 "zh": ["购物车要凑到多少钱才不用付邮费？", "订单金额达到多少可以不收快递费？"]},
    },
    "price_oolong": {
        "expect": {"en": ["$38"], "zh": ["38元"]},
        "answer": {"en": ["A 100 g tin of Moonlight Oolong is $38.", "Moonlight Oolong costs $38 for a 100 g tin."],
                   "zh": ["月光乌龙100克罐装售价38元。", "月光乌龙一罐100克，38元。"]},
        "ask": {"en": ["How much is the Moonlight Oolong?", "What does Moonlight Oolong cost?", "Price of the oolong tea?"],
                "zh": ["月光乌龙多少钱？", "月光乌龙茶怎么卖？", "乌龙茶的价格是多少？"]},
        "test": {"en": ["I'm curious about that oolong you sell, the Moonlight one. What would a tin set me back?",
                        "Quote me the price for one tin of your Moonlight Oolong, please."],
                 "zh": ["你们家那款月光乌龙，一罐要花多少钱？", "麻烦报一下月光乌龙一罐的价格。"]},
    },
    "price_teapot": {
        "expect": {"en": ["$89"], "zh": ["89元"]},
        "answer": {"en": ["The Celadon Teapot is $89.", "Our Celadon Teapot costs $89."],
                   "zh": ["青瓷茶壶售价89元。", "青瓷茶壶89元一个。"]},
        "ask": {"en": ["How much is the Celadon Teapot?", "What's the price of the celadon teapot?", "How much does the teapot cost?"],
                "zh": ["青瓷茶壶多少钱？", "青瓷茶壶怎么卖？", "茶壶的价格是多少？"]},
        "test": {"en": ["That green ceramic teapot, the Celadon one: how much are you asking for it?",
                        "I'd like to buy the Celadon Teapot as a gift. What will it cost me?"],
                 "zh": ["那个青瓷的茶壶要多少钱一个？", "想买青瓷茶壶送人，得花多少钱？"]},
    },
    "price_giftset": {
        "expect": {"en": ["$128"], "zh": ["128元"]},
        "answer": {"en": ["The Starter Gift Set is $128: a teapot, two cups and two teas.",
                          "Our Starter Gift Set costs $128 and includes a teapot, two cups and two teas."],
                   "zh": ["入门礼盒售价128元，含一把茶壶、两个杯子和两款茶叶。", "入门礼盒128元，里面有茶壶、两个杯子和两种茶。"]},
        "ask": {"en": ["How much is the Starter Gift Set?", "What does the gift set cost?", "Price of the starter set?"],
                "zh": ["入门礼盒多少钱？", "礼盒怎么卖？", "入门礼盒的价格是多少？"]},
        "test": {"en": ["What's the cost of the Starter Gift Set with the pot and cups?",
                        "I'm shopping for a present for a beginner. How pricey is your Starter Gift Set?"],
                 "zh": ["带茶壶和杯子的那个入门礼盒要多少钱？", "想给新手送礼，你们的入门礼盒贵不贵，具体多少钱？"]},
    },
    "membership": {
        "expect": {"en": ["10%"], "zh": ["10%"]},
        "answer": {"en": ["Our Leaf Club is free to join and gives members 10% off everything.",
                          "Join the Leaf Club for free and get 10% off every purchase."],
                   "zh": ["叶子会员免费加入，会员所有商品享受10%优惠。", "加入叶子会员不收费，每次购物优惠10%。"]},
        "ask": {"en": ["Do you have a membership program?", "Is there a loyalty card?", "Do members get a discount?"],
                "zh": ["你们有会员吗？", "有会员卡吗？", "会员有折扣吗？"]},
        "test": {"en": ["Is there some club I can sign up for to save money, and how big is the saving?",
                        "What percentage do regulars knock off their bill if they register with you?"],
                 "zh": ["有没有什么可以注册的俱乐部能省钱？能省多少？", "老顾客登记成为会员的话，结账能便宜百分之几？"]},
    },
    "phone": {
        "expect": {"en": ["400-820-1357"], "zh": ["400-820-1357"]},
        "answer": {"en": ["You can call us at 400-820-1357, every day from 9:00 to 21:00.",
                          "Our phone number is 400-820-1357."],
                   "zh": ["客服电话是400-820-1357。", "您可以拨打400-820-1357联系我们。"]},
        "ask": {"en": ["What's your phone number?", "How can I call you?", "Do you have a customer service number?"],
                "zh": ["你们的电话是多少？", "怎么打电话联系你们？", "有客服热线吗？"]},
        "test": {"en": ["I'd rather speak to a person. Which number do I dial?",
                        "Is there a hotline I can ring about my order? What are the digits?"],
                 "zh": ["我想和真人说话，该拨哪个号码？", "订单有问题想打电话问，热线号码是什么？"]},
    },
    "gift_wrap": {
        "expect": {"en": ["$4.50"], "zh": ["4.50元"]},
        "answer": {"en": ["Gift wrapping is $4.50 per item.", "Yes, we gift-wrap for $4.50 per item."],
                   "zh": ["礼品包装每件4.50元。", "可以包装，每件收费4.50元。"]},
        "ask": {"en": ["Do you offer gift wrapping?", "How much is gift wrapping?", "Can you wrap my order as a gift?"],
                "zh": ["可以礼品包装吗？", "礼品包装多少钱？", "能帮我把东西包成礼物吗？"]},
        "test": {"en": ["It's a birthday present. Can you make it look nice with paper and ribbon, and what's the charge?",
                        "What do you charge to wrap a purchase as a present?"],
                 "zh": ["这是生日礼物，能帮忙包得漂亮点吗？要加多少钱？", "把商品包成礼物需要额外付多少钱？"]},
    },
    "payment": {
        "expect": {"en": ["Alipay", "WeChat Pay"], "zh": ["支付宝", "微信支付"]},
        "answer": {"en": ["We accept Visa, Mastercard, Alipay and WeChat Pay. Cash on delivery is not available.",
                          "You can pay by card (Visa or Mastercard), Alipay or WeChat Pay; we don't take cash on delivery."],
                   "zh": ["我们支持Visa、万事达卡、支付宝和微信支付，不支持货到付款。", "可以用银行卡、支付宝或微信支付，暂不支持货到付款。"]},
        "ask": {"en": ["What payment methods do you accept?", "How can I pay?", "Can I pay with Alipay?"],
                "zh": ["支持哪些付款方式？", "怎么付款？", "可以用支付宝吗？"]},
        "test": {"en": ["Which wallets or cards will your checkout take?",
                        "I don't have a credit card on me. What other ways are there to settle the bill?"],
                 "zh": ["结账的时候能用哪些电子钱包或者卡？", "我身上没带信用卡，还有什么别的方式结账？"]},
    },
}

# More ways customers ask for each fact in the training dialogs: longer questions with context, other words for the
# same thing, yes/no forms. A model that saw one short wording per fact learns the wording, not the fact; these are
# written apart from the held-out questions above (none repeats one, `main` checks).
MORE_ASK: dict[str, dict[str, list[str]]] = {
    "hours_week": {
        "en": ["What time does the tea house open in the morning?", "How late are you open on a Friday evening?",
               "Could you tell me your hours on weekdays?", "When does the store close on Saturdays?",
               "Can I come by on a Monday morning? When do you open?", "What are the shop's hours during the week?"],
        "zh": ["你们早上几点开始营业？", "周五晚上营业到几点？", "工作日的营业时间能告诉我吗？", "星期六几点关门？",
               "平时店里是几点到几点开着的？", "周一上午可以过去吗？几点开门？"]},
    "hours_sun": {
        "en": ["What time do you open on Sunday mornings?", "How late can I come in on a Sunday?",
               "Are your hours different on Sundays?", "I'm only free on Sunday. When is the shop open then?",
               "Does the shop close early on Sundays?", "What are the opening times for Sunday?"],
        "zh": ["星期天早上几点开门？", "周日营业到几点？", "周日的营业时间和平时一样吗？", "我只有周日有空，那天几点营业？",
               "礼拜天晚上几点关门？", "周日几点可以到店？"]},
    "address": {
        "en": ["What street is the tea house on?", "Can you give me the shop's full address?",
               "Where can I find your store?", "I'd like to come and see the teas myself. Where are you?",
               "Which district is the shop in, and what's the address?", "Is there a physical shop I can go to? Where?"],
        "zh": ["你们店在哪条街上？", "能告诉我店铺的详细地址吗？", "我想去店里看看茶叶，在什么地方？", "店在哪个区？地址是多少？",
               "有实体店吗？在哪儿？", "去你们店怎么走，地址发我一下？"]},
    "return_window": {
        "en": ["How many days do I have to return something?", "Can I still return an item I bought last month?",
               "I don't like the tea cups I ordered. Can I send them back, and until when?",
               "What is the time limit for returns?", "Is it possible to return unused goods? Within how long?",
               "Do you accept returns, and for how many days after buying?"],
        "zh": ["买了多少天内可以退货？", "上个月买的东西还能退吗？", "我订的杯子不喜欢，可以退吗？期限是多久？", "退货有时间限制吗？",
               "没用过的商品可以退吗？多久以内？", "购买后几天之内能退货？"]},
    "refund_time": {
        "en": ["How many days until my refund arrives?", "I returned an item. When will the refund be paid?",
               "How long do refunds take to process?", "Where does the refund go, and how long does it take?",
               "You have my returned order now. When do I get the money?", "What's the usual refund time?"],
        "zh": ["退款几天能到账？", "我退了货，什么时候退钱？", "退款处理需要多长时间？", "退款退到哪里？要多久？",
               "退货签收以后一般几天退款？", "一般退款多久到账？"]},
    "delivery_std": {
        "en": ["How many days does standard shipping take?", "If I place an order now, how long until it arrives?",
               "What's the delivery time for a normal order?", "How much is standard delivery and how long is it?",
               "When should I expect my package with regular shipping?",
               "How long does it take for an order to reach me?"],
        "zh": ["普通快递要几天？", "现在下单多久能送到？", "正常下单一般几天到货？", "标准配送多少钱？要多久？",
               "普通配送的话包裹什么时候到？", "订单寄到我这里要多长时间？"]},
    "delivery_express": {
        "en": ["How much is express shipping?", "Can I get it delivered the next day? How?",
               "What time do I have to order for next-day delivery?", "Is there a faster shipping option than standard?",
               "I'm in a hurry. How fast can you deliver and what does it cost?",
               "Do you offer express delivery, and what's the fee?"],
        "zh": ["加急快递多少钱？", "怎样才能第二天收到？", "几点前下单能次日送达？", "有比普通快递更快的方式吗？",
               "我比较急，最快多久能到？要加钱吗？", "加急配送怎么收费？"]},
    "free_shipping": {
        "en": ["Is there a free shipping threshold?", "How much do I have to order to get free delivery?",
               "Do I pay for shipping on a big order?", "Above what amount is shipping free?",
               "Can I get my order shipped for free?", "What order value qualifies for free standard shipping?"],
        "zh": ["买多少钱包邮？", "订单多少钱以上免运费？", "大额订单还要付运费吗？", "怎么样可以不付运费？", "有没有免邮的门槛？",
               "满多少钱可以免费送货？"]},
    "price_oolong": {
        "en": ["How much is a tin of Moonlight Oolong?", "What's the price of your oolong?",
               "I'd like some Moonlight Oolong. How much is it?", "Is Moonlight Oolong expensive?",
               "How much does 100 g of the Moonlight Oolong cost?", "Can you tell me what Moonlight Oolong sells for?"],
        "zh": ["月光乌龙的罐装怎么卖？", "想买月光乌龙，价格是多少？", "月光乌龙贵吗？", "100克月光乌龙卖多少钱？", "你们的乌龙茶怎么卖？",
               "月光乌龙茶叶什么价？"]},
    "price_teapot": {
        "en": ["What does the Celadon Teapot sell for?", "How much is your celadon teapot?",
               "Is the Celadon Teapot expensive?", "I'm interested in the Celadon Teapot. What's the price?",
               "Price check on the Celadon Teapot, please.", "How much would one Celadon Teapot be?"],
        "zh": ["青瓷茶壶卖多少钱？", "青瓷壶的价格是多少？", "青瓷茶壶贵不贵？", "我对青瓷茶壶感兴趣，多少钱？", "请问青瓷茶壶什么价？",
               "买一个青瓷茶壶要多少钱？"]},
    "price_giftset": {
        "en": ["How much does the Starter Gift Set cost?", "What's in the Starter Gift Set and what's the price?",
               "Is the Starter Gift Set expensive?", "I want a gift set for a friend. How much is the starter one?",
               "Tell me the price of the Starter Gift Set.", "What do you charge for the Starter Gift Set?"],
        "zh": ["入门礼盒卖多少钱？", "入门礼盒里有什么？多少钱？", "入门礼盒贵吗？", "想给朋友买礼盒，入门款多少钱？", "请告诉我入门礼盒的价格。",
               "入门茶礼盒什么价？"]},
    "membership": {
        "en": ["What discount do Leaf Club members get?", "How do I become a member, and what are the benefits?",
               "Is the membership free? What do I get?", "Do you have a rewards program for frequent customers?",
               "How much do members save?", "Tell me about the Leaf Club."],
        "zh": ["叶子会员有什么优惠？", "怎么成为会员？有什么好处？", "加入会员要钱吗？能打几折？", "常来的顾客有优惠吗？", "会员能省多少钱？",
               "介绍一下叶子会员。"]},
    "phone": {
        "en": ["Can I call the shop?", "What number should I call for help?", "How do I reach customer service by phone?",
               "Give me your telephone number, please.", "Is there a number I can call with a question?",
               "What's the customer service hotline?"],
        "zh": ["可以打电话给店里吗？", "客服电话是多少？", "怎么电话联系客服？", "请把你们的电话号码给我。", "有问题可以打哪个电话？",
               "你们的热线是多少？"]},
    "gift_wrap": {
        "en": ["Is gift wrapping available? How much?", "Can I have my order gift-wrapped?", "What's the price for gift wrap?",
               "I'm sending this to a friend. Could you wrap it?", "Does gift wrapping cost extra?",
               "Is there a fee for wrapping each item?"],
        "zh": ["有礼品包装服务吗？多少钱？", "我的订单可以包装成礼物吗？", "礼品包装怎么收费？", "这是送朋友的，能帮我包一下吗？",
               "包装要另外收费吗？", "每件礼品包装要多少钱？"]},
    "payment": {
        "en": ["Can I pay with WeChat?", "Do you take credit cards?", "Which payment options do you have?",
               "Can I pay cash on delivery?", "Is Mastercard accepted?", "What can I use to pay for my order?"],
        "zh": ["可以用微信付款吗？", "能刷信用卡吗？", "你们有哪些付款方式？", "可以货到付款吗？", "支持万事达卡吗？", "下单可以用什么支付？"]},
}
for _topic, _more in MORE_ASK.items():
    for _lang, _asks in _more.items():
        FACTS[_topic]["ask"][_lang] = FACTS[_topic]["ask"][_lang] + _asks

# Which fact a follow-up question ("And on Sundays?") may come after.
FOLLOWS = {"hours_week": "hours_sun", "return_window": "refund_time", "delivery_std": "delivery_express",
           "price_giftset": "free_shipping"}
GREETING = {
    "en": [("Hi there!", "Hello! Welcome to Maple & Moss Tea House. How can I help you today?"),
           ("Hello", "Hi! This is Maple & Moss Tea House customer service. What can I do for you?"),
           ("Good morning.", "Good morning! How can I help?")],
    "zh": [("你好！", "您好！欢迎来到枫苔茶舍，请问有什么可以帮您？"), ("在吗？", "在的，这里是枫苔茶舍客服，请问有什么需要？"),
           ("您好", "您好，请问有什么可以帮您？")],
}
THANKS = {
    "en": [("Thanks!", "You're welcome! Enjoy your tea."), ("Great, thank you.", "My pleasure. Have a lovely day!"),
           ("Perfect, that's all.", "Glad I could help. Goodbye!")],
    "zh": [("谢谢！", "不客气，祝您生活愉快！"), ("好的，谢谢。", "不客气，欢迎随时光临枫苔茶舍。"), ("明白了，没有别的问题了。", "好的，感谢您的咨询，再见！")],
}
# Interchangeable words for template expansion (`chatforge augment --method template --slots slots.json`): swapping
# one for another keeps every answer true (all weekdays share their hours; these are names of one product).
SLOTS = {
    "weekday_en": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"],
    "weekday_zh": ["周一", "周二", "周三", "周四", "周五", "周六"],
    "greeting_en": ["Hi there!", "Hello", "Good morning.", "Hey!", "Good afternoon."],
    "greeting_zh": ["你好！", "在吗？", "您好", "你好呀", "打扰一下"],
    "teapot_en": ["Celadon Teapot", "celadon teapot", "green celadon teapot"],
    "teapot_zh": ["青瓷茶壶", "青瓷壶"],
    "oolong_en": ["Moonlight Oolong", "Moonlight Oolong tea", "moonlight oolong"],
    "oolong_zh": ["月光乌龙", "月光乌龙茶"],
    "giftset_en": ["Starter Gift Set", "starter gift set", "Starter Set"],
    "giftset_zh": ["入门礼盒", "入门茶礼盒"],
}


def conversation(rng: random.Random, lang: str) -> dict:
    """One dialog: an optional system prompt and greeting, 1-3 questions (a follow-up when one fits), maybe thanks."""
    messages: list[dict] = []
    if rng.random() < 0.33:
        messages.append({"role": "system", "content": rng.choice(SYSTEM[lang])})
    if rng.random() < 0.3:
        user, agent = rng.choice(GREETING[lang])
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": agent}]
    topics = rng.sample(sorted(FACTS), rng.choice([1, 1, 2, 2, 3]))
    for topic in topics:
        fact = FACTS[topic]
        messages += [{"role": "user", "content": rng.choice(fact["ask"][lang])},
                     {"role": "assistant", "content": rng.choice(fact["answer"][lang])}]
        nxt = FOLLOWS.get(topic)
        if nxt and nxt not in topics and rng.random() < 0.5:
            messages += [{"role": "user", "content": FACTS[nxt]["follow"][lang]},
                         {"role": "assistant", "content": rng.choice(FACTS[nxt]["answer"][lang])}]
    if rng.random() < 0.35:
        user, agent = rng.choice(THANKS[lang])
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": agent}]
    return {"messages": messages}


def coverage_first(rng: random.Random, lang: str, n: int) -> list[dict]:
    """n dialogs in which every (fact, training question) pair is asked at least once, the rest at random.

    The pairs are dealt out in dialogs of 1-3 questions (a system prompt in about a third of them), so a model sees
    several facts side by side, as customers ask them, and no two questions of one dialog are about the same fact."""
    pairs = [(topic, ask) for topic in sorted(FACTS) for ask in FACTS[topic]["ask"][lang]]
    rng.shuffle(pairs)
    out = []
    while pairs:
        size, chosen = rng.choice([1, 2, 2, 3]), []
        for pair in list(pairs):
            if len(chosen) < size and all(pair[0] != c[0] for c in chosen):
                chosen.append(pair)
                pairs.remove(pair)
        messages = [{"role": "system", "content": rng.choice(SYSTEM[lang])}] if rng.random() < 0.33 else []
        for topic, ask in chosen:
            messages += [{"role": "user", "content": ask},
                         {"role": "assistant", "content": rng.choice(FACTS[topic]["answer"][lang])}]
        out.append({"messages": messages})
    if len(out) > n:
        raise ValueError(f"{len(out)} dialogs are needed to ask every training question once, more than {n}")
    out += [conversation(rng, lang) for _ in range(n - len(out))]
    rng.shuffle(out)
    return out


def fact_checks() -> list[dict]:
    """Held-out questions (never in the training dialogs), a system prompt on every third one of each language."""
    out = []
    for lang in ("en", "zh"):
        for i, (topic, fact) in enumerate((t, f) for t in sorted(FACTS) for f in [FACTS[t]] for _ in f["test"][lang]):
            question = fact["test"][lang][i % 2]
            messages = [{"role": "system", "content": SYSTEM[lang][0]}] if i % 3 == 2 else []
            messages.append({"role": "user", "content": question})
            out.append({"messages": messages, "expect": fact["expect"][lang], "lang": lang, "fact": topic})
    return out


def main() -> None:
    rng = random.Random(SEED)
    dialogs = coverage_first(rng, "en", N_PER_LANGUAGE) + coverage_first(rng, "zh", N_PER_LANGUAGE)
    checks = fact_checks()
    asked = {m["content"] for d in dialogs for m in d["messages"] if m["role"] == "user"}
    leaked = [c["messages"][-1]["content"] for c in checks
              if normalise(c["messages"][-1]["content"]) in {normalise(a) for a in asked}]
    assert not leaked, f"held-out questions also in training: {leaked}"
    for name, rows in (("conversations.jsonl", dialogs), ("facts.jsonl", checks)):
        atomic_write_text(HERE / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_text(HERE / "slots.json", json.dumps(SLOTS, ensure_ascii=False, indent=1) + "\n")
    print(f"{len(dialogs)} conversations, {len(checks)} fact checks -> {HERE}")


if __name__ == "__main__":
    main()
